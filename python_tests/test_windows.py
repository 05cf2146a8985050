"""A render's batches and label windows (`safron.windows`), against the plainest reading of their definition."""

from __future__ import annotations

import numpy as np
import pytest

from safron import geometry, masks, windows

from test_engine import random_labels


@pytest.mark.parametrize("height,width", [(256, 256), (700, 500), (1000, 300)])
def test_each_window_is_the_masks_region_around_its_patch_mirrored_at_the_border(height, width):
    mask = masks.from_array(random_labels(height, width, seed=height + width))
    plan = geometry.plan(height, width)
    ys, xs = plan.origins()
    for indices in windows.batch_indices(plan, 5, 0, plan.count):
        # Background-filled past the patches, as for a model exported with a fixed batch of 7.
        out = np.full((7, plan.window, plan.window), 99, np.uint8)
        windows.label_windows(mask, plan, ys[indices], xs[indices], out)
        for k, index in enumerate(indices):
            expected = mask.read_labels(int(ys[index]) - plan.margin, int(xs[index]) - plan.margin, plan.window,
                                        plan.window)
            np.testing.assert_array_equal(out[k], expected)
        assert (out[len(indices):] == masks.BACKGROUND).all()


@pytest.mark.parametrize("batch_size,first_batch,patches_end", [(4, 0, None), (3, 2, 10), (8, 1, 9)])
def test_batches_are_fixed_slices_of_the_patch_sequence(batch_size, first_batch, patches_end):
    plan = geometry.plan(1300, 900)
    patches_end = plan.count if patches_end is None else patches_end
    batches = list(windows.batch_indices(plan, batch_size, first_batch, patches_end))
    # Each batch holds what it holds in a whole render, from batch first_batch to the one holding patch end - 1.
    whole = [np.arange(start, min(start + batch_size, plan.count)) for start in range(0, plan.count, batch_size)]
    last = (patches_end - 1) // batch_size
    assert len(batches) == last - first_batch + 1
    for got, want in zip(batches, whole[first_batch:last + 1]):
        np.testing.assert_array_equal(got, want)
