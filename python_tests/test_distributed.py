"""Many masks on Dask distributed (safron.distributed, safron-render MASK... --out-dir): a local cluster of 2 worker
processes, results equal to single-process renders, failures reported per mask, reruns that skip and resume, and a
worker killed mid-job."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install 'dask[distributed]')")

import onnx_models  # noqa: E402
from safron import engine, masks  # noqa: E402
from safron.canvas import side_paths  # noqa: E402
from safron.cli.render import main as render_main  # noqa: E402
from safron.distributed import output_path, render_many  # noqa: E402
from safron.errors import SafronInputError  # noqa: E402
from test_engine import random_labels  # noqa: E402

OPTIONS = dict(compression="deflate", threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"mix": onnx_models.context_mix(folder / "mix.onnx"), "slow": onnx_models.slow_crop(folder / "slow.onnx")}


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        yield client


def write_masks(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate([(300, 420), (520, 260), (256, 256)]):
        path = folder / f"mask{index}.png"
        Image.fromarray(masks.labels_to_colour(random_labels(*size, seed=index))).save(path)
        paths.append(path)
    bad = folder / "yellow.png"
    colours = masks.labels_to_colour(random_labels(280, 280, seed=9))
    colours[100:140, 100:140] = (255, 255, 0)
    Image.fromarray(colours).save(bad)
    return paths + [bad]


def test_many_masks_render_as_one_process_would_and_a_bad_one_fails_alone(tmp_path, models, cluster):
    paths = write_masks(tmp_path / "masks")
    out_dir = tmp_path / "out"
    outcomes = render_many(paths, out_dir, client=cluster, progress=False, model=models["mix"], **OPTIONS)
    assert [o.status for o in outcomes] == ["rendered", "rendered", "rendered", "failed"]
    assert "(255, 255, 0)" in outcomes[3].message and "\n" not in outcomes[3].message and not outcomes[3].internal
    for path in paths[:3]:
        expected = tmp_path / f"alone-{path.stem}.tif"
        engine.render(path, expected, model=models["mix"], progress=False, **OPTIONS)
        assert output_path(path, out_dir).read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["mask0.tif", "mask1.tif", "mask2.tif"]

    again = render_many(paths, out_dir, client=cluster, progress=False, model=models["mix"], **OPTIONS)
    assert [o.status for o in again] == ["skipped", "skipped", "skipped", "failed"]


def test_two_masks_with_one_name_are_refused_before_anything_runs(tmp_path, cluster):
    a, b = tmp_path / "a" / "m.png", tmp_path / "b" / "m.png"
    for path in (a, b):
        path.parent.mkdir()
        Image.fromarray(masks.labels_to_colour(random_labels(64, 64, seed=1))).save(path)
    with pytest.raises(SafronInputError, match="would both be rendered to"):
        render_many([a, b], tmp_path / "out", client=cluster, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_worker_killed_mid_render_is_replaced_and_its_job_resumes(tmp_path, models):
    from distributed import Client, LocalCluster

    labels = random_labels(1400, 500, seed=4)
    mask = tmp_path / "big.tif"
    tifffile.imwrite(mask, labels, tile=(256, 256))
    out_dir = tmp_path / "out"
    out = output_path(mask, out_dir)
    journal = side_paths(out)[1]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        outcome = {}
        job = threading.Thread(target=lambda: outcome.update(result=render_many(
            [mask], out_dir, client=client, progress=False, model=models["slow"], batch_size=2, **OPTIONS)))
        job.start()
        deadline = time.monotonic() + 240
        while (not journal.exists() or journal.stat().st_size < 200) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert journal.exists(), "the render never started"
        (pid,) = client.run(os.getpid).values()
        os.kill(pid, signal.SIGKILL)
        job.join(timeout=600)
    assert not job.is_alive()
    (result,) = outcome["result"]
    # The nanny restarted the worker and Dask reran the job, which found the journal and resumed.
    assert result.status == "resumed", result
    np.testing.assert_array_equal(tifffile.imread(out), masks.labels_to_colour(labels))
    assert sorted(p.name for p in out_dir.iterdir()) == ["big.tif"]


def test_cli_renders_a_set_reports_the_failure_and_exits_2(tmp_path, capsys, models):
    paths = write_masks(tmp_path / "masks")[2:]  # one good, one bad
    argv = [*map(str, paths), "--out-dir", str(tmp_path / "out"), "--workers", "2", "--model", str(models["mix"]),
            "--compression", "deflate", "--quiet"]
    assert render_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safron-render: error: ") and "yellow.png" in err[0], err
    assert (tmp_path / "out" / "mask2.tif").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["a.png", "b.tif", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
     "give --workers (a local cluster) or --scheduler (a running one), not both"),
    (["a.png", "--out-dir", "out", "--band-rows", "1024"], "--band-rows and --chunk split one mask into bands"),
    (["a.png", "b.png", "c.tif"], "give MASK OUT, or masks with --out-dir DIR"),
    (["a.png", "--out-dir", "out", "--resume"], "--resume is automatic with --out-dir"),
    (["a.png", "--out-dir", "out", "--profile"], "--profile times the stages of one render"),
])
def test_cli_usage_mistakes_of_the_many_mask_form_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        render_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_a_local_cluster_renders_with_one_thread_per_worker_unless_told(tmp_path, monkeypatch):
    """The command line passes threads=None when --threads is not given: that too means one thread per worker."""
    import safron.distributed as distributed

    seen = []

    class FakeCluster:
        def __init__(self, **kwargs):
            seen.append(("cluster", kwargs["n_workers"], kwargs["threads_per_worker"]))

        def close(self):
            pass

    class FakeClient:
        def __init__(self, cluster):
            pass

        def submit(self, function, mask, out, options, **kwargs):
            seen.append(("threads", options["threads"]))
            return _Done(distributed.JobOutcome(mask, out, "rendered"))

        def close(self):
            pass

    import distributed as dask_distributed

    monkeypatch.setattr(dask_distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(dask_distributed, "Client", FakeClient)
    monkeypatch.setattr(dask_distributed, "as_completed", lambda futures: iter(futures))
    paths = write_masks(tmp_path / "masks")[:2]
    for given, expected in ((None, 1), (3, 3)):
        seen.clear()
        render_many(paths, tmp_path / "out", progress=False, workers=2, threads=given)
        assert seen == [("cluster", 2, 1), ("threads", expected), ("threads", expected)], seen


class _Done:
    def __init__(self, outcome):
        self.outcome = outcome
        self.key = outcome.mask

    def result(self):
        return self.outcome
