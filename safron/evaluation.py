"""How realistic a generator's images are: the GlaS testA protocol behind `safron-eval --report`.

One command renders GlaS testA's masks with a generator and writes a report folder: report.md, report.json, plots,
and side-by-side sheets (mask | real | synthetic) of a fixed set of testA images. The figures:

* **FID and KID** (Inception-v3 features, `safron.metrics`) between the real testA images and the renders of their
  masks, two ways: whole images resized to 299 x 299 (the model card's historical figures) and 256 x 256 crops
  (six per image, seen at their true scale, so texture counts), each with a 95 % bootstrap interval. The
  bootstrap resamples *images* (with all their crops) and keeps real and synthetic paired, since crops of one image
  are not independent and the test set is what varies. The Inception network judges only: it must never appear in
  a training loss, where a generator learns to please it instead of looking real.
* **Gland fidelity** (the SAFRON paper's protocol): a gland segmenter trained on GlaS train only
  (`safron.gland_segmentation`) segments the real and the synthetic images; Dice(seg(synthetic), the gland mask it
  was rendered from) beside Dice(seg(real), its mask). Synthetic glands the segmenter cannot find do not read as
  glands.
* **Seam score**: a synthetic mask of at least 4096 x 4096 is rendered twice, the second time with the patch grid
  shifted by half a stride, so that the first render's seams lie inside the second's patches and the other way
  round. The mean absolute step (per channel) across the lines where a render's patches begin or end, over the same
  lines in the other render, both renders pooled: the mask's own edges and texture on those lines cancel, and 1
  means the stitching leaves no trace; a visible seam raises it. (Before the fourteenth session the denominator was
  the steps across all other lines of one render, so mask edges that happened to lie on seam lines counted as seams.
  Either way the score of one model moves with where the grid falls: the default of 2026-12 scored 0.73 to 1.03
  paired (renders of 4096 and 4200 px, outsets 0 and 20) and 0.74 to 1.16 unpaired (4000 to 4200 px, outsets 0 to
  40).) Its 95 % interval resamples 512 px squares of the renders (`seam_blocks`): what the score owes to the parts
  of the mask the seams cross, not to where the grid falls. So two models are compared on the same renders, paired
  over the same squares (`seam_difference`, in `--baseline` and `--compare`), never by their scores in reports of
  other renders.
* **Colour by class**: per mask class (background, stroma, gland), over all testA pixels of that class, the mean
  RGB and the 5th, 50th and 95th percentiles of the grey level, synthetic beside real: a generator that paints
  glands too dark or with too little contrast (no white goblet cells, no black nuclei) shows it here by class, where
  the colour histograms of whole images mix the classes.
* **Patch-grid lock**: the mean grey level at each distance from the image border. The first patch row and column
  start at the same place in every image (the render's outset beyond the border), so texture locked to the
  generator's patch grid makes this profile swing with the distance, where real images give a flat one (its
  standard deviation over distances 2..39); and the outermost row's excess, a frame along the border.

The masks are `masks.labels_from_gland_mask(real testA image, gland mask)`: background versus stroma outside the
glands comes from the real image (bright unstained pixels), so the label maps carry a little of the real images.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import geometry, masks
from .checkpoints import file_sha256, loss_networks
from .errors import SafronInputError

__all__ = [
    "SHEET_IMAGES", "CROP", "SEAM_SIDE", "FEATURES_FILE", "TestCase", "Interval", "SetScores", "Difference", "Report",
    "load_testa", "crops", "bootstrap_scores", "paired_difference", "compare_reports", "save_features", "load_features",
    "border_profile", "grid_lock", "colour_by_class", "dice_gap", "seam_score", "paired_seam_score", "seam_blocks",
    "seam_interval", "SeamDifference", "seam_difference", "side_by_side", "evaluate",
    "write_report",
]

# Fixed, so that sheets of different models compare image for image: glands of several sizes and grades.
SHEET_IMAGES = ("testA_1", "testA_10", "testA_25", "testA_40", "testA_55")
CROP = 256
SEAM_SIDE = 4096
SEAM_MASK_SEED = 2026
# The seam score's resampling unit: squares of the seam render, each crossed by a few seam lines of either grid.
SEAM_BLOCK = 512
DEFAULT_RESAMPLES = 200
PROFILE_DEPTH = 40
# Mask classes by label (masks.BACKGROUND, STROMA, GLAND), as the report names them.
CLASS_NAMES = ("background", "stroma", "gland")
GREY_PERCENTILES = (5, 50, 95)
# The relative half-width under which a bootstrap interval is called tight enough to rank models by.
TIGHT_INTERVAL = 0.15


@dataclass(frozen=True)
class TestCase:
    """One testA pair: the real image, its gland mask and the three-class labels rendered from it."""

    name: str
    image: np.ndarray  # uint8 (H, W, 3)
    gland: np.ndarray  # bool (H, W)
    labels: np.ndarray  # uint8 (H, W), masks.BACKGROUND / STROMA / GLAND


@dataclass(frozen=True)
class Interval:
    value: float  # on the whole test set
    low: float  # 95 % bootstrap interval
    high: float

    @property
    def relative_half_width(self) -> float:
        return (self.high - self.low) / 2 / abs(self.value) if self.value else float("inf")


@dataclass(frozen=True)
class SetScores:
    """FID and KID of one protocol (whole images or crops), with their bootstrap intervals."""

    images: int
    samples_per_set: int
    fid: Interval
    kid: Interval
    resamples: int


@dataclass
class Report:
    model: str
    model_sha256: str
    blend: str
    overlap: int
    outset: int
    whole: SetScores
    crops: SetScores
    profile_model: list[float]
    profile_real: list[float]
    seam: float | None
    seam_side: int
    dice_synthetic: float | None = None
    dice_real: float | None = None
    dice_gap: Interval | None = None  # dice_synthetic - dice_real, paired over images (None before it existed)
    segmenter: str | None = None
    reference_whole: SetScores | None = None
    reference_crops: SetScores | None = None
    baseline: str | None = None  # the report folder compared against
    # Pretrained networks the model's training losses read, from its metadata (checkpoints.METADATA_LOSS_NETWORKS).
    loss_networks: str | None = None
    versus_whole: Difference | None = None
    versus_crops: Difference | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # colour_by_class of the synthetic and the real images (empty in reports written before it existed).
    colour_model: dict = field(default_factory=dict)
    colour_real: dict = field(default_factory=dict)
    # The seam score with its interval over squares of the render, and minus the baseline's (None in reports written
    # before they existed, or without a seam render).
    seam_interval: Interval | None = None
    versus_seam: SeamDifference | None = None


# --- data ----------------------------------------------------------------------------------------------------------

def load_testa(glas: str | os.PathLike) -> list[TestCase]:
    """The testA pairs of a GlaS folder (GLAS/testA/images/*.png with GLAS/testA/masks/*.png), sorted by name, read
    as training reads its pairs (`data.read_pair`): the same checks, and the same three classes from a gland mask."""
    from .data import read_pair

    folder = Path(glas) / "testA"
    images, gland_masks = folder / "images", folder / "masks"
    if not images.is_dir() or not gland_masks.is_dir():
        raise SafronInputError(f"{glas}: no testA/images and testA/masks folders (the GlaS layout)")
    paths = sorted(images.glob("*.png"))
    if not paths:
        raise SafronInputError(f"{images}: no PNG images")
    cases = []
    for path in paths:
        mask_path = gland_masks / path.name
        if not mask_path.is_file():
            raise SafronInputError(f"{path}: no gland mask {mask_path}")
        image, labels = read_pair(path, mask_path)
        cases.append(TestCase(path.stem, image, labels == masks.GLAND, labels))
    return cases


def crops(image: np.ndarray, size: int = CROP) -> list[np.ndarray]:
    """The floor(H / size) x floor(W / size) crops of `image`, spread evenly from border to border (whole pixels,
    no overlap), in raster order; none when the image is smaller than `size`."""
    height, width = image.shape[:2]
    rows, cols = height // size, width // size

    def starts(extent: int, count: int) -> list[int]:
        return [round(k * (extent - size) / (count - 1)) if count > 1 else (extent - size) // 2 for k in range(count)]

    return [image[y:y + size, x:x + size] for y in starts(height, rows) for x in starts(width, cols)]


# --- FID / KID with bootstrap intervals ----------------------------------------------------------------------------

def _fid_kid(real: np.ndarray, generated: np.ndarray) -> tuple[float, float]:
    from .metrics import fid, unbiased_mmd2

    return fid(real, generated), unbiased_mmd2(real, generated)


def _bootstrap(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], sizes: tuple[int, int], paired: bool,
               resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(statistic on all images, 1.96 bootstrap standard deviations of it), resampling image indices of two sets of
    `sizes` with replacement, with the same draws for both when `paired`.

    The normal interval, value +- 1.96 standard deviations: resampling with replacement repeats images, which
    biases FID upwards, so percentile intervals can miss the value itself; the spread is what we want."""
    if resamples < 1:
        raise SafronInputError(f"resamples must be >= 1, got {resamples}")
    value = np.asarray(statistic(np.arange(sizes[0]), np.arange(sizes[1])), np.float64)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        chosen = rng.integers(0, sizes[0], sizes[0])
        samples.append(statistic(chosen, chosen if paired else rng.integers(0, sizes[1], sizes[1])))
    spread = 1.959964 * np.asarray(samples).std(axis=0, ddof=1) if resamples > 1 else np.zeros_like(value)
    return value, spread


def _intervals(value: np.ndarray, spread: np.ndarray) -> tuple[Interval, ...]:
    return tuple(Interval(float(v), float(v - d), float(v + d)) for v, d in zip(value, spread))


def _one_interval(statistic: Callable[[np.ndarray], float], units: int, resamples: int, seed: int) -> Interval:
    """The interval of one scalar `statistic` of `units` resampled units (squares, test images)."""
    value, spread = _bootstrap(lambda chosen, _: statistic(chosen), (units, units), True, resamples, seed)
    return _intervals(value[None], spread[None])[0]


def _gather(groups: Sequence[np.ndarray], indices: np.ndarray) -> np.ndarray:
    return np.concatenate([groups[i] for i in indices])


def bootstrap_scores(real: Sequence[np.ndarray], generated: Sequence[np.ndarray],
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, paired: bool = True) -> SetScores:
    """FID and KID between two feature sets grouped by image (`real[i]`, `generated[i]`: [k_i, D] features of the
    crops of test image i, or of the whole image), with 95 % intervals from `resamples` resamplings of the images
    with replacement. `paired`: generated[i] was made from real[i]'s mask, so both are resampled with the
    same draws; otherwise (real train vs real testA) each set is resampled on its own."""
    if len(real) < 2 or len(generated) < 2 or (paired and len(real) != len(generated)):
        raise SafronInputError(f"need {'the same number' if paired else 'at least 2'} of real and generated images "
                               f"(>= 2), got {len(real)} and {len(generated)}")
    value, spread = _bootstrap(lambda a, b: _fid_kid(_gather(real, a), _gather(generated, b)),
                               (len(real), len(generated)), paired, resamples, seed)
    fid_interval, kid_interval = _intervals(value, spread)
    return SetScores(len(generated), sum(len(g) for g in generated), fid_interval, kid_interval, resamples)


@dataclass(frozen=True)
class Difference:
    """A candidate's FID and KID minus a baseline's on the same test images (negative: the candidate is closer to
    the real images), with paired 95 % intervals."""

    fid: Interval
    kid: Interval

    @property
    def verdict(self) -> str:
        if self.fid.high < 0 and self.kid.high < 0:
            return "better"
        if self.fid.low > 0 and self.kid.low > 0:
            return "worse"
        return "not told apart"


def paired_difference(real: Sequence[np.ndarray], candidate: Sequence[np.ndarray], baseline: Sequence[np.ndarray],
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Difference:
    """FID and KID of `candidate` minus those of `baseline`, both against `real` (features grouped by test image,
    the same images in the same order), each resample scoring both on the same draw of images. Much tighter than
    two separate intervals: most of what varies between draws of test images moves both models alike."""
    if not len(real) == len(candidate) == len(baseline) >= 2:
        raise SafronInputError(f"need the same number (>= 2) of images in all three sets, got {len(real)}, "
                               f"{len(candidate)} and {len(baseline)}")

    def statistic(chosen, _):
        reference = _gather(real, chosen)
        return (np.asarray(_fid_kid(reference, _gather(candidate, chosen)))
                - np.asarray(_fid_kid(reference, _gather(baseline, chosen))))

    value, spread = _bootstrap(statistic, (len(real), len(real)), True, resamples, seed)
    return Difference(*_intervals(value, spread))


FEATURES_FILE = "features.npz"
SEAM_FEATURES = "seam_blocks"  # its record of `seam_blocks`, for paired seam differences


def save_features(path: Path, groups: dict[str, Sequence[np.ndarray]]) -> None:
    """Grouped features (name -> one [k_i, D] array per test image) as one compressed .npz."""
    arrays = {}
    for name, group in groups.items():
        arrays[name] = np.concatenate(group).astype(np.float32)  # float32: half the file, far below FID's noise
        arrays[f"{name}.counts"] = np.array([len(g) for g in group], np.int64)
    np.savez_compressed(path, **arrays)


def load_features(path: Path) -> dict[str, list[np.ndarray]]:
    """What `save_features` wrote, or a one-line error for a file that is not such a record."""
    try:
        with np.load(path) as stored:
            data = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as exc:
        raise SafronInputError(f"{path}: not a safron-eval features file ({exc})") from None
    groups = {}
    for name in (n for n in data if not n.endswith(".counts")):
        counts = data.get(f"{name}.counts")
        if counts is None or counts.sum() != len(data[name]):
            raise SafronInputError(f"{path}: features {name!r} without matching counts")
        groups[name] = np.split(data[name].astype(np.float64), np.cumsum(counts)[:-1])
    return groups


# --- seams and the patch grid --------------------------------------------------------------------------------------

def border_profile(images: Sequence[np.ndarray], depth: int = PROFILE_DEPTH) -> np.ndarray:
    """Mean grey level at each distance 0..depth-1 from the image border, over the four sides of all images."""
    total = np.zeros(depth)
    for image in images:
        grey = np.asarray(image, np.float64).mean(axis=2)
        for d in range(depth):
            inner = slice(d, grey.shape[0] - d), slice(d, grey.shape[1] - d)
            sides = (grey[d, inner[1]], grey[-1 - d, inner[1]], grey[inner[0], d], grey[inner[0], -1 - d])
            total[d] += np.concatenate(sides).mean()
    return total / len(images)


def colour_by_class(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict[str, dict]:
    """Per mask class present (CLASS_NAMES), over its pixels in all `images` (uint8 HxWx3, with label maps HxW): the
    share of all pixels, the mean RGB and the grey level's GREY_PERCENTILES (grey = the mean of R, G and B, in 1/3
    levels). Histograms, so that the 60 testA images need no copy of their pixels."""
    rgb_sums = np.zeros((len(CLASS_NAMES), 3), np.int64)
    grey = np.zeros((len(CLASS_NAMES), 766), np.int64)  # histograms of R + G + B
    for image, label in zip(images, labels):
        if image.shape[:2] != label.shape:
            raise ValueError(f"an image of {image.shape[:2]} with labels of {label.shape}")
        for k in range(len(CLASS_NAMES)):
            pixels = image[label == k].astype(np.int64)
            rgb_sums[k] += pixels.sum(axis=0)
            grey[k] += np.bincount(pixels.sum(axis=1), minlength=766)
    total = grey.sum()
    found = {}
    for k, name in enumerate(CLASS_NAMES):
        count = grey[k].sum()
        if not count:
            continue
        cumulative = np.cumsum(grey[k])
        found[name] = {
            "share": float(count / total),
            "mean_rgb": (rgb_sums[k] / count).tolist(),
            "grey_percentiles": {str(q): float(np.searchsorted(cumulative, q / 100 * count) / 3)
                                 for q in GREY_PERCENTILES},
        }
    return found


def grid_lock(profile: np.ndarray) -> tuple[float, float]:
    """(standard deviation of the profile over distances 2.., rim excess level(0) - mean level(2..))."""
    return float(profile[2:].std()), float(profile[0] - profile[2:].mean())


def _patch_edges(origins: np.ndarray, patch: int, size: int) -> np.ndarray:
    """Indices b of the steps between pixel b and b + 1 where a patch begins or ends inside [0, size)."""
    edges = {int(o) - 1 for o in origins if o > 0} | {int(o) + patch - 1 for o in origins if o + patch < size}
    return np.array(sorted(edges), np.int64)


def _seam_steps(image: np.ndarray, plan, outset: int, block: int
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(|step| across each row line, the same across each column line, per direction whether the line is where one
    of the plan's patches begins or ends); step b lies between pixels b and b + 1. A line's steps come summed over
    its segments of `block` px, each sum over the line's length: [lines, segments], whose rows sum to the line's
    mean |step|."""
    pixels = np.asarray(image, np.float32)
    height, width = plan.height - 2 * outset, plan.width - 2 * outset
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"image {pixels.shape[:2]} does not match the plan's {height} x {width} (outset {outset})")
    # Per channel, not on grey levels: the three mask colours, say, all have the same grey level.
    steps_y = _segment_sums(np.abs(np.diff(pixels, axis=0)).mean(axis=2), block) / width
    steps_x = _segment_sums(np.abs(np.diff(pixels, axis=1)).mean(axis=2).T, block) / height
    edges = []
    for steps, origins, size in ((steps_y, np.asarray(plan.ys) - outset, height),
                                 (steps_x, np.asarray(plan.xs) - outset, width)):
        on_edge = np.zeros(len(steps), bool)
        on_edge[_patch_edges(origins, plan.patch, size)] = True
        edges.append(on_edge)
    return steps_y, steps_x, edges


def _segment_sums(steps: np.ndarray, block: int) -> np.ndarray:
    """[lines, length] -> [lines, ceil(length / block)]: sums over consecutive runs of `block` along each line."""
    return np.add.reduceat(steps.astype(np.float64), np.arange(0, steps.shape[1], block), axis=1)


def seam_blocks(image: np.ndarray, plan, outset: int, control: np.ndarray, control_plan, control_outset: int,
                block: int = SEAM_BLOCK) -> np.ndarray:
    """The paired seam score (`paired_seam_score`) split over the squares of `block` x `block` px of the renders
    (raster order): [blocks, 2], column 0 the steps across each render's seam lines inside the square, column 1 the
    steps across the same lines in the other render, both in units of line means. Column 0's sum over column 1's is
    the score; resampling the squares gives its interval (`seam_interval`) and, for two models scored on the same
    renders, the paired interval of their difference (`seam_difference`)."""
    first = _seam_steps(image, plan, outset, block)
    second = _seam_steps(control, control_plan, control_outset, block)
    if first[0].shape != second[0].shape or first[1].shape != second[1].shape:
        raise ValueError(f"the two renders differ in size: {image.shape[:2]} and {control.shape[:2]}")
    rows, cols = first[1].shape[1], first[0].shape[1]  # squares down (column lines' segments) and across
    sums = np.zeros((2, rows, cols))
    for mine, theirs in ((first, second), (second, first)):
        for direction in range(2):
            lines = np.flatnonzero(mine[2][direction])
            for column, steps in enumerate((mine[direction], theirs[direction])):
                # Row lines (direction 0) run across the squares of row line // block; column lines down those of
                # column line // block.
                if direction == 0:
                    np.add.at(sums[column], lines // block, steps[lines])
                else:
                    np.add.at(sums[column].T, lines // block, steps[lines])
    if not sums[1].sum():
        raise ValueError("the plans have a single patch, or the control has no steps: there is no seam to score")
    return sums.reshape(2, -1).T


def paired_seam_score(image: np.ndarray, plan, outset: int, control: np.ndarray, control_plan, control_outset: int
                      ) -> float:
    """The seam score of two renders of one mask whose grids are offset (`image` on `plan` grown by `outset`,
    `control` on `control_plan` grown by `control_outset`): the mean |step| across each render's seam lines over the
    mean |step| across the same lines in the other render, both pooled. 1: seams leave no trace."""
    blocks = seam_blocks(image, plan, outset, control, control_plan, control_outset)
    return float(blocks[:, 0].sum() / blocks[:, 1].sum())


def _seam_ratio(blocks: np.ndarray, chosen: np.ndarray) -> float:
    picked = blocks[chosen]
    return picked[:, 0].sum() / picked[:, 1].sum()


def seam_interval(blocks: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The seam score of `seam_blocks` with a 95 % interval from resampling its squares: how much the score would
    move had the seam lines fallen on other parts of the mask."""
    blocks = np.asarray(blocks, np.float64)
    return _one_interval(lambda chosen: _seam_ratio(blocks, chosen), len(blocks), resamples, seed)


@dataclass(frozen=True)
class SeamDifference:
    """A candidate's seam score minus a baseline's on the same seam renders (the same mask and grids), with the
    paired 95 % interval over squares: negative, fewer traces of the stitching than the baseline."""

    score: Interval

    @property
    def verdict(self) -> str:
        if self.score.high < 0:
            return "better"
        if self.score.low > 0:
            return "worse"
        return "not told apart"


def seam_difference(candidate: np.ndarray, baseline: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> SeamDifference:
    """`candidate`'s seam score minus `baseline`'s (both `seam_blocks` of renders of the same mask on the same grids),
    each resample drawing the same squares for both: what the mask under the seams does to both cancels."""
    candidate, baseline = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if candidate.shape != baseline.shape:
        raise SafronInputError(f"seam blocks of {candidate.shape[0]} and {baseline.shape[0]} squares: not the same "
                               "seam renders")
    return SeamDifference(_one_interval(lambda chosen: _seam_ratio(candidate, chosen) - _seam_ratio(baseline, chosen),
                                        len(candidate), resamples, seed))


def seam_score(image: np.ndarray, plan, outset: int = 0) -> float:
    """Mean |step| across the lines where the plan's patches begin or end, over the mean across all other lines,
    both directions and the three channels pooled: 1 when seams are as smooth as the texture around them, but which
    mask edges the seams fall on moves it too (`paired_seam_score` cancels that). `plan`: the render's grid, over
    the image grown by `outset` on every side (`engine.render_array(outset=)`)."""
    steps_y, steps_x, edges = _seam_steps(image, plan, outset, max(image.shape[:2]))
    seam_sum = seam_count = other_sum = other_count = 0.0
    for steps, on_edge in zip((steps_y[:, 0], steps_x[:, 0]), edges):
        seam_sum, seam_count = seam_sum + steps[on_edge].sum(), seam_count + on_edge.sum()
        other_sum, other_count = other_sum + steps[~on_edge].sum(), other_count + (~on_edge).sum()
    if not seam_count:
        raise ValueError("the plan has a single patch: there is no seam to score")
    return float((seam_sum / seam_count) / (other_sum / other_count))


# --- pictures ------------------------------------------------------------------------------------------------------

def side_by_side(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], scale: float = 1.0,
                 gap: int = 8) -> np.ndarray:
    """uint8 sheet with one row per (mask colours, real, synthetic), each panel resized by `scale`, on white."""
    from PIL import Image

    def resized(panel: np.ndarray) -> np.ndarray:
        if scale == 1.0:
            return panel
        height, width = panel.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.asarray(Image.fromarray(panel).resize(size, Image.LANCZOS))

    panels = [[resized(p) for p in row] for row in rows]
    height = sum(max(p.shape[0] for p in row) for row in panels) + gap * (len(panels) - 1)
    width = max(sum(p.shape[1] for p in row) + gap * (len(row) - 1) for row in panels)
    sheet = np.full((height, width, 3), 255, np.uint8)
    top = 0
    for row in panels:
        left = 0
        for panel in row:
            sheet[top:top + panel.shape[0], left:left + panel.shape[1]] = panel
            left += panel.shape[1] + gap
        top += max(p.shape[0] for p in row) + gap
    return sheet


def _centre(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    y, x = max((height - size) // 2, 0), max((width - size) // 2, 0)
    return image[y:y + size, x:x + size]


# --- the whole protocol --------------------------------------------------------------------------------------------

def _grouped_features(images: Sequence[np.ndarray], crop: int | None, progress: bool, what: str) -> list[np.ndarray]:
    from tqdm import tqdm

    from .metrics import inception_features

    groups = []
    for image in tqdm(images, desc=what, unit="image", disable=not progress, leave=False):
        pieces = [image] if crop is None else crops(image, crop)
        groups.append(inception_features(pieces))
    return groups


def _gland_dice(cases: Sequence[TestCase], rendered: Sequence[np.ndarray], threads: int | None
                ) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(per test image: Dice of seg(synthetic) vs its gland mask, the same for seg(real); the segmenter's path), or
    None when this installation has no segmenter."""
    from .gland_segmentation import SEGMENTER_PATH, dice, segment_glands

    if not Path(SEGMENTER_PATH).is_file():
        return None
    real = segment_glands([c.image for c in cases], threads=threads)
    synthetic = segment_glands(list(rendered), threads=threads)
    truth = [c.gland for c in cases]
    return (np.array([dice(s, t) for s, t in zip(synthetic, truth)]),
            np.array([dice(r, t) for r, t in zip(real, truth)]), str(SEGMENTER_PATH))


def dice_gap(synthetic: Sequence[float], real: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0) -> Interval:
    """Mean gland Dice of the synthetic images minus that of the real ones (per test image, both against its gland
    mask), with a 95 % interval resampling the images, paired: whether a gap to the real images' Dice is beyond what
    the test set can tell. Positive: the segmenter finds the synthetic glands more easily than the real ones."""
    synthetic, real = np.asarray(synthetic, np.float64), np.asarray(real, np.float64)
    if synthetic.shape != real.shape or synthetic.ndim != 1 or len(synthetic) < 2:
        raise SafronInputError(f"need per-image Dice of the same >= 2 images, got {synthetic.shape} and {real.shape}")
    gaps = synthetic - real
    return _one_interval(lambda chosen: gaps[chosen].mean(), len(gaps), resamples, seed)


def evaluate(
    glas: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    blend: str | None = None,
    overlap: int | None = None,
    outset: int | None = None,
    threads: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seam_side: int = SEAM_SIDE,
    reference: bool = False,
    baseline: str | os.PathLike | None = None,
    progress: bool = True,
) -> Report:
    """Run the protocol (module docstring) and write the report folder `out_dir`; returns the figures.

    `baseline`: the folder of an earlier report (another model, the same test images): the report then adds this
    model's FID and KID minus the baseline's, with paired intervals, from the features that report saved."""
    from tqdm import tqdm

    from . import engine
    from .backends import create_backend

    _pyplot()  # before the long work: a missing plotting library is the user's one-line install hint
    if seam_side and seam_side < 2 * geometry.PATCH:
        raise SafronInputError(f"the seam render must be at least {2 * geometry.PATCH} px so that patches meet, "
                               f"got {seam_side}")
    blend = blend or engine.DEFAULT_BLEND
    overlap = engine.DEFAULT_OVERLAP if overlap is None else overlap
    outset = engine.DEFAULT_OUTSET if outset is None else outset
    model_path = Path(model) if model is not None else engine.default_model_path()
    out_dir = Path(out_dir)
    cases = load_testa(glas)
    baseline_features = None
    if baseline is not None:
        baseline_file = Path(baseline) / FEATURES_FILE
        if not baseline_file.is_file():
            raise SafronInputError(f"{baseline}: not a safron-eval report folder (no {FEATURES_FILE})")
        baseline_features = load_features(baseline_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    backend = create_backend("auto", model_path, threads=threads)
    try:
        rendered = [engine.render_array(c.labels, backend=backend, blend=blend, overlap=overlap, outset=outset)
                    for c in tqdm(cases, desc="render testA", unit="image", disable=not progress, leave=False)]
        seconds["render testA"] = time.perf_counter() - started
        seam_squares = None
        if seam_side:
            started = time.perf_counter()
            labels = masks.synthesize(seam_side, seam_side, seed=SEAM_MASK_SEED)
            seam_image = engine.render_array(labels, backend=backend, blend=blend, overlap=overlap, outset=outset,
                                             progress=progress)
            # The control: the grid shifted by half a stride, its seams inside the first render's patches.
            shifted = outset + (geometry.PATCH - overlap) // 2
            control = engine.render_array(labels, backend=backend, blend=blend, overlap=overlap, outset=shifted,
                                          progress=progress)
            seam_squares = seam_blocks(
                seam_image, geometry.render_plan(seam_side, seam_side, outset, overlap=overlap), outset,
                control, geometry.render_plan(seam_side, seam_side, shifted, overlap=overlap), shifted)
            _save(out_dir / "seam_detail.png", _centre(seam_image, 1024))
            seconds["seam render"] = time.perf_counter() - started
    finally:
        backend.close()

    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    real_images, synthetic = [c.image for c in cases], rendered
    scores, differences, features = {}, {}, {}
    train = _train_images(glas) if reference else None
    for name, crop in (("whole", None), ("crops", CROP)):
        real_features = _grouped_features(real_images, crop, progress, f"features real ({name})")
        synthetic_features = _grouped_features(synthetic, crop, progress, f"features synthetic ({name})")
        features |= {f"real_{name}": real_features, f"synthetic_{name}": synthetic_features}
        scores[name] = bootstrap_scores(real_features, synthetic_features, resamples)
        if train is not None:
            train_features = _grouped_features(train, crop, progress, f"features train ({name})")
            scores[f"reference_{name}"] = bootstrap_scores(real_features, train_features, resamples, paired=False)
        if baseline_features is not None:
            differences[name] = paired_difference(
                real_features, synthetic_features, _baseline_group(baseline_features, name, real_features, baseline),
                resamples)
    seam = versus_seam = None
    if seam_squares is not None:
        seam = seam_interval(seam_squares, resamples)
        features[SEAM_FEATURES] = [seam_squares]
        if baseline_features is not None:
            versus_seam = _seam_versus(seam_squares, _seam_render(blend, overlap, outset, seam_side),
                                       baseline_features, _stored_seam_render(baseline), resamples)
    save_features(out_dir / FEATURES_FILE, features)
    seconds["features and scores"] = time.perf_counter() - started

    started = time.perf_counter()
    dice_synthetic = dice_real = segmenter = gap = None
    per_image = _gland_dice(cases, rendered, threads)
    if per_image is not None:
        synthetic_dice, real_dice, segmenter = per_image
        dice_synthetic, dice_real = float(synthetic_dice.mean()), float(real_dice.mean())
        gap = dice_gap(synthetic_dice, real_dice, resamples)
        seconds["gland segmentation"] = time.perf_counter() - started

    labels = [c.labels for c in cases]
    report = Report(
        model=str(model_path), model_sha256=file_sha256(model_path) if model_path.is_file() else "", blend=blend,
        overlap=overlap, outset=outset, whole=scores["whole"], crops=scores["crops"],
        profile_model=border_profile(rendered).tolist(), profile_real=border_profile(real_images).tolist(),
        seam=seam.value if seam else None, seam_side=seam_side, dice_synthetic=dice_synthetic,
        dice_real=dice_real, dice_gap=gap, segmenter=segmenter,
        reference_whole=scores.get("reference_whole"), reference_crops=scores.get("reference_crops"),
        baseline=str(baseline) if baseline is not None else None, versus_whole=differences.get("whole"),
        versus_crops=differences.get("crops"), seconds=seconds, loss_networks=loss_networks(model_path),
        colour_model=colour_by_class(rendered, labels), colour_real=colour_by_class(real_images, labels),
        seam_interval=seam, versus_seam=versus_seam,
    )
    by_name = {c.name: (c, image) for c, image in zip(cases, rendered)}
    sheet_rows = [(masks.labels_to_colour(c.labels), c.image, image)
                  for name in SHEET_IMAGES if name in by_name for c, image in [by_name[name]]]
    if sheet_rows:
        _save(out_dir / "sheet.png", side_by_side(sheet_rows, scale=0.5))
        _save(out_dir / "sheet_detail.png",
              side_by_side([tuple(_centre(panel, 320) for panel in row) for row in sheet_rows]))
    _plots(out_dir, report, real_images, rendered)
    write_report(report, out_dir)
    return report


def _baseline_group(stored: dict[str, list[np.ndarray]], name: str, real: list[np.ndarray],
                    baseline) -> list[np.ndarray]:
    """The baseline's synthetic features for protocol `name`, once its real ones show it scored the same images."""
    theirs = stored.get(f"real_{name}")
    same = theirs is not None and len(theirs) == len(real) and all(
        a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(theirs, real))
    if not same or f"synthetic_{name}" not in stored:
        raise SafronInputError(f"{baseline}: that report scored other test images (or another feature network); "
                               f"compare reports of the same GlaS testA")
    return stored[f"synthetic_{name}"]


def _seam_render(blend: str, overlap: int, outset: int, seam_side: int) -> tuple:
    """What makes two reports' seam renders the same renders: the mask's side, the grids and the blend."""
    return seam_side, overlap, outset, blend


def _stored_seam_render(folder: str | os.PathLike) -> tuple | None:
    """`_seam_render` of a report folder, from its report.json (None when unreadable)."""
    try:
        stored = json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))
        return _seam_render(stored["blend"], stored["overlap"], stored["outset"], stored["seam_side"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _seam_versus(squares: np.ndarray, render: tuple, baseline_features: dict, baseline_render: tuple | None,
                 resamples: int) -> SeamDifference | None:
    """The paired seam difference against a baseline's stored squares, or None when the baseline has none (a report
    from before the seam interval, or without a seam render) or rendered other seams (side, grids or blend)."""
    theirs = baseline_features.get(SEAM_FEATURES)
    if theirs is None or baseline_render != render or theirs[0].shape != np.shape(squares):
        return None
    return seam_difference(squares, theirs[0], resamples)


def compare_reports(candidate: str | os.PathLike, baseline: str | os.PathLike,
                    resamples: int = DEFAULT_RESAMPLES) -> dict[str, Difference | SeamDifference]:
    """{"whole": ..., "crops": ...[, "seam": ...]}: the paired differences between the models of two report folders,
    from the features each saved, without rendering or the feature network again (what `--baseline` adds to a
    report, for reports already written: seconds instead of minutes). Both must have scored the same test images;
    "seam" is there when both rendered the same seam renders and saved their squares."""
    stored = {}
    for name, folder in (("candidate", candidate), ("baseline", baseline)):
        path = Path(folder) / FEATURES_FILE
        if not path.is_file():
            raise SafronInputError(f"{folder}: not a safron-eval report folder (no {FEATURES_FILE})")
        stored[name] = load_features(path)
    differences = {}
    for name in ("whole", "crops"):
        real = stored["candidate"].get(f"real_{name}")
        if real is None or f"synthetic_{name}" not in stored["candidate"]:
            raise SafronInputError(f"{candidate}: its {FEATURES_FILE} lacks the {name} protocol's features")
        theirs = _baseline_group(stored["baseline"], name, real, baseline)
        differences[name] = paired_difference(real, stored["candidate"][f"synthetic_{name}"], theirs, resamples)
    ours = stored["candidate"].get(SEAM_FEATURES)
    render = _stored_seam_render(candidate)
    if ours is not None and render is not None:
        seams = _seam_versus(ours[0], render, stored["baseline"], _stored_seam_render(baseline), resamples)
        if seams is not None:
            differences["seam"] = seams
    return differences


def _train_images(glas: str | os.PathLike) -> list[np.ndarray]:
    paths = sorted((Path(glas) / "train" / "images").glob("*.png"))
    if not paths:
        raise SafronInputError(f"{glas}: no train/images/*.png for the real-vs-real reference")
    from .metrics import read_rgb

    return [read_rgb(p) for p in paths]


def _save(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SafronInputError("the report's plots need matplotlib: pip install matplotlib (or safron[metrics])") \
            from None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def _plots(out_dir: Path, report: Report, real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(report.profile_real, label="real testA")
    axis.plot(report.profile_model, label="synthetic")
    axis.set(xlabel="distance from the image border (px)", ylabel="mean grey level",
             title="Border profile (flat = no patch-grid lock)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "border_profile.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(10, 3), sharey=True)
    bins = np.arange(257)
    for channel, (axis, name) in enumerate(zip(axes, ("red", "green", "blue"))):
        for images, label in ((real, "real testA"), (synthetic, "synthetic")):
            counts = sum(np.bincount(im[..., channel].ravel(), minlength=256) for im in images)
            axis.stairs(counts / counts.sum(), bins, label=label)
        axis.set(title=name, xlabel="level")
    axes[0].set_ylabel("fraction of pixels")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out_dir / "colour_histograms.png", dpi=100)
    plt.close(figure)


def _interval(interval: Interval, digits: int) -> str:
    return (f"{interval.value:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}] "
            f"(half-width {100 * interval.relative_half_width:.0f} %)")


def _signed(interval: Interval, digits: int) -> str:
    return f"{interval.value:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"


def _colour_lines(report: Report) -> list[str]:
    if not report.colour_model:
        return []
    percentiles = " / ".join(f"p{q}" for q in GREY_PERCENTILES)
    lines = ["", f"Colour by class (mean RGB; grey level {percentiles}), synthetic vs real:", "",
             "| class | share of pixels | mean RGB, synthetic | mean RGB, real | grey, synthetic | grey, real |",
             "|---|---|---|---|---|---|"]

    def rgb(stats):
        return "(" + ", ".join(f"{v:.0f}" for v in stats["mean_rgb"]) + ")"

    def grey(stats):
        return " / ".join(f"{stats['grey_percentiles'][str(q)]:.0f}" for q in GREY_PERCENTILES)

    for name in CLASS_NAMES:
        model, real = report.colour_model.get(name), report.colour_real.get(name)
        if model and real:
            lines.append(f"| {name} | {100 * real['share']:.0f} % | {rgb(model)} | {rgb(real)} | {grey(model)} | "
                         f"{grey(real)} |")
    return lines


def write_report(report: Report, out_dir: str | os.PathLike) -> Path:
    """report.md and report.json in `out_dir`; returns the path of report.md."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    std_model, rim_model = grid_lock(np.asarray(report.profile_model))
    std_real, rim_real = grid_lock(np.asarray(report.profile_real))
    lines = [
        "# safron-eval report: GlaS testA",
        "",
        f"- model: `{report.model}` (sha256 `{report.model_sha256[:16]}...`)" if report.model_sha256 else
        f"- model: `{report.model}`",
        f"- rendering: blend {report.blend}, overlap {report.overlap}, outset {report.outset}; masks from the testA "
        "gland masks, background vs stroma from the real images",
        "- features: Inception-v3 pool (2048-d), used for scoring only, never in training",
        f"- pretrained networks in the model's training losses (its metadata): {report.loss_networks or 'none'}",
        f"- intervals: 95 % bootstrap over the {report.whole.images} test images ({report.whole.resamples} "
        "resamples, real and synthetic paired)",
        "",
        "| protocol | samples per set | FID [95 % interval] | KID [95 % interval] |",
        "|---|---|---|---|",
    ]
    rows = [("whole images, 299 px", report.whole), (f"{CROP} px crops", report.crops)]
    if report.reference_whole is not None:
        rows += [("reference: real train vs testA, whole", report.reference_whole),
                 (f"reference: real train vs testA, {CROP} px crops", report.reference_crops)]
    for name, scores in rows:
        lines.append(f"| {name} | {scores.samples_per_set} | {_interval(scores.fid, 1)} | {_interval(scores.kid, 4)} |")
    if report.baseline is not None:
        lines += ["", f"Against the baseline report `{report.baseline}` (this model minus the baseline on the same "
                  "test images, paired intervals; negative = closer to the real images):", "",
                  "| protocol | FID difference [95 %] | KID difference [95 %] | verdict |", "|---|---|---|---|"]
        for name, difference in (("whole images", report.versus_whole), (f"{CROP} px crops", report.versus_crops)):
            lines.append(f"| {name} | {_signed(difference.fid, 1)} | {_signed(difference.kid, 4)} | "
                         f"{difference.verdict} |")
        if report.versus_seam is not None:
            lines += ["", f"Seam score minus the baseline's on the same seam renders (paired over {SEAM_BLOCK} px "
                      f"squares): {_signed(report.versus_seam.score, 3)}, {report.versus_seam.verdict}."]
    lines += ["", "| figure | synthetic | real |", "|---|---|---|"]
    if report.dice_synthetic is not None:
        lines.append(f"| gland Dice (segmenter vs gland mask) | {report.dice_synthetic:.3f} | {report.dice_real:.3f} |")
        if report.dice_gap is not None:
            lines.append(f"| gland Dice, synthetic minus real (paired over images) | {_signed(report.dice_gap, 3)} | |")
    else:
        lines.append("| gland Dice | not computed: no gland segmenter in this installation | |")
    if report.seam_interval is not None:
        lines.append(f"| seam score ({report.seam_side} x {report.seam_side} render; 1 = no trace) | "
                     f"{_interval(report.seam_interval, 3)} | |")
    lines += [
        f"| border profile std (levels; flat = no grid lock) | {std_model:.2f} | {std_real:.2f} |",
        f"| rim excess (levels) | {rim_model:+.1f} | {rim_real:+.1f} |",
        *_colour_lines(report),
        "",
        "![side by side](sheet.png)",
        "",
        "`sheet.png`: mask | real | synthetic for " + ", ".join(SHEET_IMAGES) + " at half scale; "
        "`sheet_detail.png`: their centres at full scale; `seam_detail.png`: the centre of the seam render.",
        "",
        "![border profile](border_profile.png) ![colours](colour_histograms.png)",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report.seconds.items()),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
