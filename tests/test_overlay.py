"""The overlay drawing shared by the Secondary Capture and the dashboard's thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.encode.overlay import BOX_COLOUR, PALETTE, frame_pixels, render_overlay
from tests.encode_cases import film_with_masks, volume


def test_masks_are_tinted_in_their_label_colour(tmp_path: Path) -> None:
    film, masks = film_with_masks(tmp_path, pneumothorax=True)
    plain = render_overlay(film, limit=DEFAULT_LIMIT)
    drawn = render_overlay(film, masks=masks[0], limit=DEFAULT_LIMIT)
    assert plain.shape == drawn.shape == (int(film.Rows), int(film.Columns), 3)
    assert drawn.dtype == np.uint8
    assert (plain[..., 0] == plain[..., 2]).all()  # grey without masks
    outside = ~masks[0].any(axis=0)
    assert np.array_equal(plain[outside], drawn[outside])
    for index in range(3):
        tint = drawn[masks[0, index]].astype(int) - plain[masks[0, index]].astype(int)
        towards = np.sign(np.asarray(PALETTE[index]) - 127)
        assert (tint.mean(axis=0) * towards).sum() > 0  # pulled towards the label colour


def test_boxes_caption_frame_and_size(tmp_path: Path) -> None:
    source, boxes = volume(tmp_path, masses=1)
    box = boxes[0]
    picture = render_overlay(
        source,
        frame=box.frame,
        boxes=[(box.x, box.y, box.width, box.height, "")],
        limit=DEFAULT_LIMIT,
    )
    assert tuple(picture[int(box.y), int(box.x) + 2]) == BOX_COLOUR
    assert not np.array_equal(
        frame_pixels(source, 1, limit=DEFAULT_LIMIT),
        frame_pixels(source, box.frame, limit=DEFAULT_LIMIT),
    )
    captioned = render_overlay(
        source, caption="cadnode dbt-detector", max_size=64, limit=DEFAULT_LIMIT
    )
    assert captioned.shape == (64, 64, 3)
    assert captioned[:3].max() > 200 and captioned[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        render_overlay(source, frame=17, limit=DEFAULT_LIMIT)
    with pytest.raises(ValueError, match="masks"):
        render_overlay(source, masks=np.zeros((1, 10, 10), dtype=bool), limit=DEFAULT_LIMIT)
