"""Look at a segmented movie in napari: the image, the labels and the tracks, frame by frame.

    python view.py results/movie                          # segment.py's result folder
    python view.py results/movie --screenshot view.png    # also save what the window shows
    python view.py results/movie --screenshot view.png --close   # save it and quit (no interaction)

napari is an optional extra: `pip install -r requirements-view.txt` (napari and a Qt binding). The layers:
    image    the movie's frames as segment.py read them (the file named in segment.json, same channel and frames)
    labels   labels.ome.tif, labels = track ids (each cell keeps its colour along its track)
    tracks   napari's Tracks layer from cells.csv: each track's centroid over time, daughters joined to their mother
All three at the movie's pixel size (µm) where it is known.
"""
import argparse
import json
import os
import sys

import numpy as np

from data_files import DataError, error_line


def layers_data(out: str) -> dict:
    """What the three layers show, read from segment.py's result folder: image (T, Y, X) or None where the movie
    cannot be read any more, labels (T, Y, X), tracks (N, 4) rows of (track, frame, y, x), graph {track: [parent]},
    scale (µm per px, or 1) and a note on anything missing."""
    import pandas as pd
    import tifffile
    from movie_io import parse_frames, read_movie
    paths = {name: os.path.join(out, name) for name in ("segment.json", "labels.ome.tif", "cells.csv")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing; view.py opens a result folder that segment.py wrote")
    with open(paths["segment.json"]) as file:
        summary = json.load(file)
    labels = tifffile.imread(paths["labels.ome.tif"])
    cells = pd.read_csv(paths["cells.csv"]).sort_values(["track", "frame"])
    tracks = cells[["track", "frame", "centroid_y", "centroid_x"]].to_numpy(np.float64).reshape(-1, 4)
    parents = cells.groupby("track")["parent"].first()
    present = set(parents.index)
    graph = {int(track): [int(parent)] for track, parent in parents.items() if parent and parent in present}
    image, note = None, None
    try:
        movie = read_movie(summary["movie"], summary.get("channel"), summary.get("position"),
                           parse_frames(summary.get("frames", ":")), summary.get("z"))
        image = movie.frames
        if image.shape != labels.shape:
            image, note = None, f"{summary['movie']}: frames {image.shape} no longer match the labels {labels.shape}"
    except DataError as error:
        note = f"{error}; showing the labels and tracks only"
    return {"image": image, "labels": labels, "tracks": tracks, "graph": graph,
            "scale": summary.get("pixel_size_um") or 1.0, "note": note}


def build_viewer(out: str, show: bool = True):
    """A napari viewer with the layers image (where the movie is readable), labels and tracks."""
    import napari
    data = layers_data(out)
    if data["note"]:
        print(f"warning: {data['note']}", file=sys.stderr)
    scale = (1, data["scale"], data["scale"])
    viewer = napari.Viewer(title=f"segment.py result: {out}", show=show)
    if data["image"] is not None:
        viewer.add_image(data["image"], name="image", scale=scale, colormap="gray")
    viewer.add_labels(data["labels"], name="labels", scale=scale, opacity=0.4)
    if len(data["tracks"]):
        viewer.add_tracks(data["tracks"], graph=data["graph"], name="tracks", scale=scale, tail_length=10)
    viewer.dims.set_point(0, 0)
    return viewer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="segment.py's result folder (segment.json, labels.ome.tif, cells.csv)")
    parser.add_argument("--screenshot", default=None, metavar="PNG", help="save the window's picture here "
                        "(default: none)")
    parser.add_argument("--frame", type=int, default=None, help="the frame to show first (default: 0)")
    parser.add_argument("--close", action="store_true", help="quit after the screenshot instead of opening the "
                        "window for interaction")
    args = parser.parse_args(argv)
    try:
        import napari
    except ImportError:
        sys.exit("error: napari is not installed: pip install -r requirements-view.txt (an optional extra)")
    try:
        viewer = build_viewer(args.out, show=True)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    if args.frame is not None:
        viewer.dims.set_point(0, args.frame)
    print("layers: " + ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in viewer.layers))
    if args.screenshot:
        viewer.screenshot(args.screenshot, canvas_only=False)
        print(f"wrote {args.screenshot}")
    if args.close:
        viewer.close()
        return viewer
    napari.run()
    return viewer


if __name__ == "__main__":
    main()
