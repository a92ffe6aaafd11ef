"""A training recipe: every setting of a run that is not the user's data or machine, chosen once from a YAML file
(recipes/*.yaml) and never asked again deep inside. train.py reads it, records it in the run folder (recipe.yaml)
and hands the parts to the data, the model and the Trainer.

    recipe = load_recipe("recipes/patches.yaml", overrides=["ema_decay=0.99"])
    print(recipe_yaml(recipe))
"""
import dataclasses
import os

import yaml

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
DEFAULT_RECIPE = os.path.join(RECIPES_DIR, "patches.yaml")


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    view: str = "tiled"               # "resized": whole frames resized to input_size; "tiled": frames at the model's
                                      # scale, random patches in training, whole frames in tiles (views.py)
    num_epochs: int = 15              # also the cosine schedule's length
    batch_size: int = 8
    lr: float = 1e-3                  # Adam's learning rate, annealed to 0 by a cosine over num_epochs
    fine_tune_lr: float | str = "auto"  # with --init_from: "auto" takes 1e-4 where the starting model already
                                      # segments the validation frames (Instance Dice >= 0.5), else 1e-3
    widths: tuple = (32, 64, 128, 256)  # channels of the U-Net's levels (one level more: twice the field of view)
    intensity: str = "percentile"     # normalisation: "percentile" (every dtype stretched per frame) or "baseline"
    input_size: int = 512             # resized view: frames are resized to this square
    patch_size: int = 128             # tiled view: side of the random training patches
    patches_per_epoch: int = 128      # tiled view: patches in one epoch
    tile_size: int = 512              # tiled view: tile side for validation and inference on whole frames
    augment: bool = True              # tiled view: scale, rotation, mirror, intensity augmentation of the patches
    turn: bool = True                 # rotations and mirrors (off for masks at a fixed offset from the cells)
    min_zoom: float = 0.7             # patches zoomed log-uniformly between these: the widths of cells the model
    max_zoom: float = 1.4             # learns, around its own (cells in a movie change width as they grow and spread)
    photometric: bool = True          # gamma, contrast, brightness, blur and noise (off for one microscope, one setting)
    contact_weight: float = 0.0       # extra loss weight where touching cells meet (the U-Net paper's weight map)
    dice_weight: float = 0.0          # loss = cross-entropy + this x soft Dice of border and core (unet.soft_dice_loss)
    min_ceiling: float = 0.97         # tiled view, from scratch: enlarge frames until the border-core representation
                                      # holds the training cells this well (scale.representable_width; 0: own scale)
    max_cell_width: float = 0.0       # tiled view, from scratch: cells wider than this are shrunk to it (0: never)
    ema_decay: float = 0.0            # exponential moving average of the weights (0: off)
    size_filter: bool = True          # choose the size filter (min_area_fraction) on the validation frames
    test_flips: bool = False          # the model predicts with its logits averaged over the four mirror images (four
                                      # passes a frame); recorded in the checkpoint, inference.py --test_flips overrides
    min_steps: int = 200              # no early end (max_time) before this many optimiser steps
    val_every: int = 1                # validate (and so choose best.ckpt) every this many epochs; with num_epochs a
                                      # multiple of it the last epoch is validated
    early_stopping_patience: int = 0  # stop when val_instance_dice has not improved for this many validations (0: never)
    accelerator: str = "auto"         # Lightning's: auto, gpu, cpu

    def __post_init__(self):
        checks = {
            "view": self.view in ("resized", "tiled"),
            "intensity": self.intensity in ("percentile", "baseline"),
            "num_epochs": self.num_epochs >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0, "fine_tune_lr": self.fine_tune_lr == "auto" or (
                isinstance(self.fine_tune_lr, (int, float)) and self.fine_tune_lr > 0),
            "widths": len(self.widths) >= 2 and all(isinstance(w, int) and w > 0 for w in self.widths),
            "patches_per_epoch": self.patches_per_epoch >= 1, "contact_weight": self.contact_weight >= 0,
            "dice_weight": self.dice_weight >= 0,
            "min_zoom": 0 < self.min_zoom <= self.max_zoom, "max_zoom": self.max_zoom >= self.min_zoom,
            "ema_decay": 0 <= self.ema_decay < 1, "min_steps": self.min_steps >= 0,
            "min_ceiling": 0 <= self.min_ceiling <= 1, "max_cell_width": self.max_cell_width >= 0,
            "early_stopping_patience": self.early_stopping_patience >= 0, "val_every": self.val_every >= 1,
        }
        multiple = 2 ** (len(self.widths) - 1)
        for name in ("input_size", "patch_size", "tile_size"):
            checks[name] = getattr(self, name) > 0 and getattr(self, name) % multiple == 0
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise RecipeError(", ".join(f"{name}: {getattr(self, name)!r} is not allowed" for name in bad) +
                              f" (sizes must be positive multiples of {multiple}: one 2x2 pooling per level)")


FIELDS = {field.name: field for field in dataclasses.fields(Recipe)}


def _typed(name: str, value):
    """A value of a recipe key as its field's type (YAML and the command line give strings, ints, lists)."""
    default = FIELDS[name].default
    if name == "fine_tune_lr" and value == "auto":
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise RecipeError(f"{name}: true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        try:
            return tuple(int(item) for item in items)
        except (TypeError, ValueError):
            raise RecipeError(f"{name}: a list of integers, got {value!r}") from None
    try:
        return type(default)(value) if not isinstance(default, str) or name != "fine_tune_lr" else float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name}: a {type(default).__name__}, got {value!r}") from None


def load_recipe(path: str = DEFAULT_RECIPE, overrides=()) -> Recipe:
    """The recipe of a YAML file (keys of Recipe; a key left out takes Recipe's default), then `overrides`
    ("key=value" strings, as --set gives them)."""
    try:
        with open(path) as file:
            values = yaml.safe_load(file) or {}
    except OSError as error:
        raise RecipeError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a mapping of recipe keys expected")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise RecipeError(f"--set {override}: KEY=VALUE expected")
        values[key.strip()] = yaml.safe_load(value)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    return Recipe(**{name: _typed(name, value) for name, value in values.items()})


def recipe_yaml(recipe: Recipe) -> str:
    values = {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(recipe).items()}
    return yaml.safe_dump(values, sort_keys=False)
