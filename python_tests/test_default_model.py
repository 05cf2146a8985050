"""The embedded default generator: present, meeting the contract, and rendering H&E-like colour."""

from __future__ import annotations


from safron import engine, masks
from safron.backends.onnx_runtime import OnnxRuntimeBackend


def test_default_model_meets_the_contract():
    backend = OnnxRuntimeBackend(engine.default_model_path(), threads=1)
    assert (backend.signature.window, backend.signature.patch) == (296, 256)
    assert engine.default_model_path().stat().st_size <= 40 * 2**20


def test_default_model_renders_eosin_and_haematoxylin_colours():
    labels = masks.synthesize(300, 300, seed=3)
    image = engine.render_array(labels, batch_size=4).astype(float)
    assert image.std() > 5  # structure, not a flat colour
    stroma, gland = image[labels == masks.STROMA].mean(0), image[labels == masks.GLAND].mean(0)
    # H&E is pink to purple: red and blue above green, in stroma and glands alike.
    for colour in (stroma, gland):
        assert colour[0] > colour[1] and colour[2] > colour[1]
