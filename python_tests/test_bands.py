"""One mask in row bands on Dask (safron.bands, engine.render(client=), safron-render MASK OUT --workers N): a local
cluster of 2 worker processes; OME-Zarr levels equal to the single-process render and its TIFF pyramid, the TIFF
assembled from bands equal byte for byte, a worker killed mid-band, and one-line errors."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install 'safron[distributed]')")
zarr = pytest.importorskip("zarr", reason="zarr is not installed (pip install 'safron[distributed]')")

import onnx_models  # noqa: E402
from safron import bands, engine, masks  # noqa: E402
from safron.cli.render import main as render_main  # noqa: E402
from safron.errors import SafronInputError, WorkerLostError  # noqa: E402
from safron.pyramid_tiff import pyramid_shapes  # noqa: E402
from test_engine import random_labels  # noqa: E402

HEIGHT, WIDTH = 700, 530
# Chunks of 64 rows and bands of 192: 4 bands whose edges (192, 384, 576) fall inside patches of the grid (rows 0,
# 222, 444 with the default geometry), so each band must recompute the patches it shares with its neighbours.
LAYOUT = dict(chunk=64, band_rows=192)
OPTIONS = dict(threads=1, progress=False, mpp=0.5)


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        yield client


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A mask, a model whose pixels depend on their context, and the single-process renders to compare with."""
    folder = tmp_path_factory.mktemp("bands")
    labels = random_labels(HEIGHT, WIDTH, seed=3)
    mask = folder / "mask.png"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask)
    model = onnx_models.context_mix(folder / "mix.onnx")
    alone = {}  # lossless for comparing pixels; JPEG, the default, for comparing bytes too
    for compression in ("deflate", "jpeg"):
        alone[compression] = folder / f"alone-{compression}.tif"
        engine.render(mask, alone[compression], model=model, compression=compression, **OPTIONS)
    return dict(folder=folder, mask=mask, model=model, labels=labels, alone=alone,
                image=engine.render_array(labels, model=model, threads=1))


def test_scene_straddles_patches():
    plan = engine.geometry.plan(HEIGHT, WIDTH)
    edges = range(LAYOUT["band_rows"], HEIGHT, LAYOUT["band_rows"])
    assert len(edges) >= 2 and not set(edges) & set(plan.ys.tolist())


def tiff_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tiff:
        return [page.asarray() for page in tiff.pages]


def tiles(path: Path) -> list[bytes]:
    """The raw (compressed) bytes of every tile of every level."""
    with tifffile.TiffFile(path) as tiff, open(path, "rb") as raw:
        found = []
        for page in tiff.pages:
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                raw.seek(offset)
                found.append(raw.read(count))
        return found


def zarr_levels(path: Path) -> list[np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return [np.moveaxis(group[str(level)][:], 0, 2) for level in range(len(list(group.array_keys())))]


def test_one_mask_in_bands_gives_the_single_process_pixels_in_ome_zarr(scene, cluster):
    out = scene["folder"] / "bands.ome.zarr"
    result = engine.render(scene["mask"], out, model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    plan = engine.geometry.plan(HEIGHT, WIDTH)
    assert result.patches > plan.count  # the patches straddling band edges, rendered by both bands
    levels = zarr_levels(out)
    np.testing.assert_array_equal(levels[0], scene["image"])
    expected = tiff_levels(scene["alone"]["deflate"])
    assert len(levels) == len(expected) == len(pyramid_shapes(HEIGHT, WIDTH))
    for level, (got, want) in enumerate(zip(levels, expected)):
        np.testing.assert_array_equal(got, want, err_msg=f"level {level}")
    # Nothing left beside it: no partial store, no lock.
    assert sorted(p.name for p in scene["folder"].iterdir() if p.name.startswith("bands")) == ["bands.ome.zarr"]


def test_the_ome_zarr_opens_with_zarr_and_ome_zarr_with_its_pyramid_and_pixel_size(scene, cluster):
    pytest.importorskip("ome_zarr", reason="ome-zarr is not installed (pip install 'safron[test]')")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = scene["folder"] / "opened.ome.zarr"
    engine.render(scene["mask"], out, model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    shapes = pyramid_shapes(HEIGHT, WIDTH)
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 3 and group.attrs["ome"]["version"] == "0.5"
    assert group["0"].chunks == (3, 64, 64) and group["0"].dtype == np.uint8
    location = parse_url(str(out))
    assert location is not None and location.version == "0.5"
    node = list(Reader(location)())[0]
    assert [tuple(level.shape) for level in node.data] == [(3, h, w) for h, w in shapes]
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "y", "x"]
    assert all(axis.get("unit") == "micrometer" for axis in node.metadata["axes"][1:])
    scales = [transforms[0]["scale"] for transforms in node.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 0.5 * 2**k, 0.5 * 2**k] for k in range(len(shapes))]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(node.data[0]), 0, 2), scene["image"])

    # Rendered again over it: a store of ours is replaced.
    engine.render(scene["mask"], out, model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    np.testing.assert_array_equal(zarr_levels(out)[0], scene["image"])


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_a_tiff_assembled_from_bands_is_the_single_process_tiff_byte_for_byte(scene, cluster, compression):
    out = scene["folder"] / f"bands-{compression}.tif"
    alone = scene["alone"][compression]
    engine.render(scene["mask"], out, model=scene["model"], client=cluster, compression=compression, **LAYOUT,
                  **OPTIONS)
    for level, (got, want) in enumerate(zip(tiff_levels(out), tiff_levels(alone), strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"level {level}")
    if compression == "deflate":
        np.testing.assert_array_equal(tiff_levels(out)[0], scene["image"])
    assert tiles(out) == tiles(alone)  # the writer is deterministic: the same pixels give the same tiles
    assert out.read_bytes() == alone.read_bytes()
    assert sorted(p.name for p in scene["folder"].iterdir() if p.name.startswith(out.name)) == [out.name]


def band_that_kills_its_worker_once(mask, store, y0, y1, *, marker, **options):
    """engine.render_band, except that the band at row 192 kills its own worker process once, right after writing its
    first chunk row (mid-band: the rest of its chunks are not written)."""
    from safron import zarr_output

    marker = Path(marker)
    if y0 == 192 and not marker.exists():
        marker.write_text(str(os.getpid()))
        write_rows = zarr_output.write_rows

        def write_then_die(*args, **kwargs):
            write_rows(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        zarr_output.write_rows = write_then_die
    return engine.render_band(mask, store, y0, y1, **options)


def test_a_worker_killed_mid_band_is_replaced_and_the_band_rerun_exactly(scene, cluster, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setattr(engine, "render_band", functools.partial(band_that_kills_its_worker_once, marker=marker))
    out = tmp_path / "killed.tif"
    engine.render(scene["mask"], out, model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    assert marker.exists(), "no band killed its worker"
    assert int(marker.read_text()) not in cluster.run(os.getpid).values()
    assert out.read_bytes() == scene["alone"]["jpeg"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "killed.tif"]


def band_that_always_kills_its_worker(mask, store, y0, y1, **options):
    """engine.render_band, except that the band at row 192 kills its worker every time (out of memory, say)."""
    if y0 == 192:
        os.kill(os.getpid(), signal.SIGKILL)
    return engine.render_band(mask, store, y0, y1, **options)


def test_a_band_whose_worker_always_dies_is_one_line_and_resumable(scene, tmp_path, monkeypatch, capsys):
    import dask
    from distributed import Client, LocalCluster

    monkeypatch.setattr(engine, "render_band", band_that_always_kills_its_worker)
    out = tmp_path / "lost.tif"
    # allowed-failures 0: the first death is final (3 by default, each a worker restart).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client, pytest.raises(WorkerLostError, match="died each time it ran bands task") as caught:
        engine.render(scene["mask"], out, model=scene["model"], client=client, **LAYOUT, **OPTIONS)
    assert "--resume" in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() and bands.scratch_store(out).is_dir(), "the finished bands are kept for --resume"

    # The command line says the same in one line and exits 1, not with a traceback.
    monkeypatch.setattr("safron.cli.render._dask_client", _client_allowing_no_failures)
    code = render_main([str(scene["mask"]), str(tmp_path / "lost2.tif"), "--model", str(scene["model"]), "--workers",
                        "2", "--band-rows", "192", "--chunk", "64", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "died each time it ran bands task" in err[0], err


@contextlib.contextmanager
def _client_allowing_no_failures(args, workers):
    """safron-render's own local cluster, but one whose scheduler gives up on a task at its first dead worker."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        yield client


def band_that_logs(mask, store, y0, y1, *, log, fail_at=None, **options):
    """engine.render_band, noting each band it is asked for in the folder `log`; the band at row `fail_at` raises."""
    (Path(log) / str(y0)).touch()
    if y0 == fail_at:
        raise RuntimeError(f"band {y0} fails")
    return engine.render_band(mask, store, y0, y1, **options)


@pytest.mark.parametrize("name", ["resumed.ome.zarr", "resumed.tif"])
def test_an_interrupted_render_in_bands_resumes_with_the_bands_not_done(scene, cluster, tmp_path, monkeypatch, name):
    from safron import bands, zarr_output
    from safron.files import partial_path

    out = tmp_path / name
    store = bands.scratch_store(out) if name.endswith(".tif") else partial_path(out)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.setattr(engine, "render_band", functools.partial(band_that_logs, log=first, fail_at=384))
    with pytest.raises(RuntimeError, match="band 384 fails"):
        engine.render(scene["mask"], out, model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    assert not out.exists() and store.is_dir()
    done = zarr_output.bands_done(store)
    assert (384, 576) not in done and done <= {(0, 192), (192, 384), (576, 700)}

    with pytest.raises(SafronInputError, match="cannot resume: blend differs"):
        engine.render(scene["mask"], out, model=scene["model"], client=cluster, resume=True, blend="linear",
                      **LAYOUT, **OPTIONS)
    with pytest.raises(SafronInputError, match="cannot resume: outset differs"):
        engine.render(scene["mask"], out, model=scene["model"], client=cluster, resume=True, outset=0,
                      **LAYOUT, **OPTIONS)
    monkeypatch.setattr(engine, "render_band", functools.partial(band_that_logs, log=second))
    engine.render(scene["mask"], out, model=scene["model"], client=cluster, resume=True, **LAYOUT, **OPTIONS)
    assert sorted(int(p.name) for p in second.iterdir()) == sorted({0, 192, 384, 576} - {y0 for y0, _ in done})
    if name.endswith(".tif"):
        assert out.read_bytes() == scene["alone"]["jpeg"].read_bytes()
    else:
        np.testing.assert_array_equal(zarr_levels(out)[0], scene["image"])
        assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2", "zarr.json"]  # no band marks left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", name, "second"]


def test_a_bad_colour_in_one_band_is_one_line_and_leaves_nothing(tmp_path, scene, cluster):
    colours = masks.labels_to_colour(scene["labels"])
    colours[600:620, 100:120] = (255, 255, 0)  # in the last band only
    mask = tmp_path / "yellow.png"
    Image.fromarray(colours).save(mask)
    with pytest.raises(SafronInputError, match=r"\(255, 255, 0\)") as error:
        engine.render(mask, tmp_path / "out.ome.zarr", model=scene["model"], client=cluster, **LAYOUT, **OPTIONS)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yellow.png"]


def _fails_or_waits_for_stop(index, folder, *, stop):
    """Task 0 reports a failure after the others have started; the others run until `stop` is set (up to 30 s) and
    note how they ended in `folder`."""
    if index == 0:
        time.sleep(0.5)
        return "bad"
    for _ in range(600):
        if stop.is_set():
            time.sleep(0.3)  # a chunk row still being written when the signal comes
            (Path(folder) / f"stopped-{index}").touch()
            return None
        time.sleep(0.05)
    (Path(folder) / f"ran-out-{index}").touch()


def test_a_failure_returns_only_after_the_running_tasks_saw_the_stop(cluster, tmp_path):
    def refuse(index, result):
        if result == "bad":
            raise SafronInputError("task 0 failed")

    started = time.perf_counter()
    with pytest.raises(SafronInputError, match="task 0 failed"):
        bands._Tasks(cluster, progress=False).run(_fails_or_waits_for_stop, [(0, str(tmp_path)), (1, str(tmp_path))],
                                                  desc="test", weights=[1, 1], unit="task", on_result=refuse,
                                                  stoppable=True)
    # Task 1 had finished by the time run raised: what the caller removes next stays removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stopped-1"]
    assert time.perf_counter() - started < 20


def _fails_or_ignores_stop(index, *, stop):
    if index == 0:
        time.sleep(0.5)
        return "bad"
    time.sleep(3)


def test_a_task_deaf_to_the_stop_does_not_hide_the_failure(cluster, monkeypatch):
    def refuse(index, result):
        if result == "bad":
            raise SafronInputError("task 0 failed")

    monkeypatch.setattr(bands, "STOP_WAIT_SECONDS", 0.2)
    with pytest.raises(SafronInputError, match="task 0 failed"):
        bands._Tasks(cluster, progress=False).run(_fails_or_ignores_stop, [(0,), (1,)], desc="test", weights=[1, 1],
                                                  unit="task", on_result=refuse, stoppable=True)


class _SetAfter:
    """An event that reads as set from its `calls`-th look on."""

    def __init__(self, calls: int):
        self.calls, self.looks = calls, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.calls


@pytest.mark.parametrize("calls", [1, 3])
def test_a_stopped_band_returns_none_and_writes_no_more_chunk_rows(scene, tmp_path, calls):
    from safron import zarr_output

    store = tmp_path / "band.zarr"
    zarr_output.create(store, HEIGHT, WIDTH, chunk=64, mpp=None, levels=False)
    stop = _SetAfter(calls)  # 1: set before the band starts; 3: after it wrote one chunk row (its first look: start)
    outcome = engine.render_band(str(scene["mask"]), str(store), 192, 384, model=str(scene["model"]),
                                 backend="onnxruntime", batch_size=None, blend="cosine", overlap=20, threads=1,
                                 colour_tolerance=195.0, stop=stop)
    assert outcome is None
    band = zarr_output.read_rows(store, 192, 384)
    written = 64 if calls == 3 else 0
    np.testing.assert_array_equal(band[:written], scene["image"][192:192 + written])
    assert not band[written:].any() and scene["image"][192 + written:384].any()


@pytest.mark.parametrize("out,options,needle", [
    ("out.tif", dict(band_rows=192), "band rows and chunk are for a render in bands"),
    ("out.ome.zarr", dict(band_rows=192), "band rows split a render across Dask workers"),
    ("out.ome.zarr", dict(chunk=40), "chunk must be a multiple of 16"),
    ("out.ome.zarr", dict(resume=True), "cannot resume: no interrupted render in bands"),
    ("out.png", {}, "or an OME-Zarr, named .zarr"),
])
def test_band_options_that_do_not_fit_are_one_line(tmp_path, scene, out, options, needle):
    with pytest.raises(SafronInputError, match=needle) as error:
        engine.render(scene["mask"], tmp_path / out, model=scene["model"], **options)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_band_rows_off_the_chunks_are_refused(tmp_path, scene, cluster):
    with pytest.raises(SafronInputError, match="band rows must be a multiple of the chunk side 64"):
        engine.render(scene["mask"], tmp_path / "out.tif", model=scene["model"], client=cluster, chunk=64,
                      band_rows=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda path: (path.mkdir(), (path / "notes.txt").write_text("mine")),
    lambda path: path.write_text("a file"),
    lambda path: (path.mkdir(), (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')),
])
def test_a_zarr_path_that_is_not_ours_is_left_alone(tmp_path, scene, make):
    out = tmp_path / "taken.zarr"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SafronInputError, match="exists and is not an OME-Zarr written by safron"):
        engine.render(scene["mask"], out, model=scene["model"], **OPTIONS)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_renders_one_mask_in_bands_on_local_workers(tmp_path, scene, capsys):
    out = tmp_path / "cli.tif"
    argv = [str(scene["mask"]), str(out), "--workers", "2", "--band-rows", "192", "--chunk", "64", "--mpp", "0.5",
            "--model", str(scene["model"]), "--quiet"]
    assert render_main(argv) == 0, capsys.readouterr().err
    assert out.read_bytes() == scene["alone"]["jpeg"].read_bytes()


@pytest.mark.parametrize("argv,needle", [
    (["--band-rows", "100"], "band rows split a render across Dask workers"),
    (["--workers", "2", "--chunk", "64", "--band-rows", "100"], "band rows must be a multiple of the chunk side 64"),
])
def test_cli_band_mistakes_are_one_line_exit_2(tmp_path, scene, capsys, argv, needle):
    assert render_main([str(scene["mask"]), str(tmp_path / "out.ome.zarr"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
