"""Layout: token positions for the three kinds of attention call."""

from __future__ import annotations

import pytest

from attnmap.layout import Layout


def test_joint_text_first_positions() -> None:
    lay = Layout.joint(text=4, grid=(2, 3, 5))
    assert (lay.num_queries, lay.num_keys, lay.num_video) == (34, 34, 30)
    assert lay.text_q == slice(0, 4) and lay.text_k == slice(0, 4)
    assert lay.video_q == slice(4, 34) and lay.video_k == slice(4, 34)


def test_joint_video_first_positions() -> None:
    lay = Layout.joint(text=4, grid=(2, 3, 5), text_first=False)
    assert lay.video_q == slice(0, 30)
    assert lay.text_q == slice(30, 34)


def test_self_with_prefix() -> None:
    lay = Layout.self_attn(grid=(4, 2, 2), prefix=1)
    assert (lay.num_queries, lay.num_keys) == (17, 17)
    assert lay.video_q == slice(1, 17) and lay.text_q is None and lay.text_k is None
    assert lay.frame_tokens == 4 and lay.frames == 4


def test_cross_positions() -> None:
    lay = Layout.cross(grid=(21, 30, 52), text=512)
    assert (lay.num_queries, lay.num_keys) == (32760, 512)
    assert lay.video_k is None and lay.text_k == slice(0, 512)
    assert lay.supports("cross") and not lay.supports("temporal")


@pytest.mark.parametrize(
    "lay",
    [
        Layout.joint(text=3, grid=(1, 2, 2), text_first=False),
        Layout.self_attn(grid=(2, 2, 2), prefix=2),
        Layout.cross(grid=(3, 1, 4), text=7, prefix=1),
    ],
    ids=str,
)
def test_round_trip_through_dict(lay: Layout) -> None:
    assert Layout.from_dict(lay.to_dict()) == lay


def test_check_names_the_mismatch() -> None:
    lay = Layout.cross(grid=(2, 2, 2), text=5)
    lay.check(8, 5)
    with pytest.raises(
        ValueError, match=r"layout Layout.cross\(grid=\(2, 2, 2\), text=5, prefix=0\) expects 8 queries"
    ):
        lay.check(8, 6)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Layout.self_attn(grid=(0, 2, 2)), "grid must be a tuple"),
        (lambda: Layout.self_attn(grid=(2, 2)), "grid must be a tuple"),
        (lambda: Layout.cross(grid=(1, 1, 1), text=0), "text must be an int >= 1"),
        (lambda: Layout.joint(text=-1, grid=(1, 1, 1)), "text must be an int >= 0"),
        (lambda: Layout.self_attn(grid=(1, 1, 1), prefix=1.5), "prefix must be an int"),
        (lambda: Layout.from_dict({"kind": "diag"}), "layout kind must be"),
    ],
)
def test_bad_layouts_name_the_argument(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_statistics_are_supported_where_their_tokens_are() -> None:
    joint = Layout.joint(text=3, grid=(2, 2, 2))
    self_ = Layout.self_attn(grid=(2, 2, 2), prefix=1)
    cross = Layout.cross(grid=(2, 2, 2), text=4)
    for lay in (joint, self_, cross):
        assert lay.supports("blocks") and lay.supports("entropy") and lay.supports("received")
        assert lay.supports("blocks", block_size=(2, 3)) and lay.supports("blocks", block_size=4)
    assert joint.supports("distance") and self_.supports("distance") and not cross.supports("distance")
    # video cubes need video keys: a cross call has none
    assert joint.supports("blocks", block_size=(1, 2, 2)) and self_.supports("blocks", block_size=[1, 1, 1])
    assert not cross.supports("blocks", block_size=(1, 2, 2))
    assert not cross.supports("temporal", block_size=(1, 2, 2))
