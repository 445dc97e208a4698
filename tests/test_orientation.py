"""Sources shown turned: a clip whose container carries a display rotation (phones store portrait video as landscape
pixels plus a matrix) and an image with an EXIF Orientation tag (cameras store the sensor's pixels plus a tag).
probe must give the displayed size and load_sample the displayed pixels, or they train sideways. Broken images
must be BadFile. Every file is written here, small; nothing is downloaded."""

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import config
import data

W, H, FRAMES = 64, 48, 9  # stored landscape: a quarter turn shows it 48 x 64


def marked_pixels() -> np.ndarray:
    """Black [H, W, 3] uint8 with a white 16 px block in the top-left corner and a grey one in the
    top-right: where the two land tells every turn and flip apart."""
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:16, :16] = 255
    pixels[:16, -16:] = 128
    return pixels


def corner_of(video: torch.Tensor, level: str) -> str:
    """Which 8 x 8 corner of the first frame of a [3, F, H, W] video in [-1, 1] is white, or grey; the other
    two corners must be black."""
    frame = video[:, 0].mean(dim=0)
    corners = {"top-left": frame[:8, :8], "top-right": frame[:8, -8:],
               "bottom-left": frame[-8:, :8], "bottom-right": frame[-8:, -8:]}
    means = {name: float(block.mean()) for name, block in corners.items()}
    white = [name for name, m in means.items() if m > 0.7]
    grey = [name for name, m in means.items() if -0.3 < m < 0.3]
    black = [name for name, m in means.items() if m < -0.7]
    assert len(white) == 1 and len(grey) == 1 and len(black) == 2, means
    return white[0] if level == "white" else grey[0]


def tkhd_matrix_at(blob: bytes) -> int:
    """Offset of the display matrix in an mp4's first track header (ISO 14496-12 8.3.2, the QuickTime matrix):
    a version-0 'tkhd' box is size(4) 'tkhd' version(1) flags(3), then creation, modification, track id,
    reserved, duration (5 x 4), reserved(8) layer(2) group(2) volume(2) reserved(2), then the matrix: 9
    big-endian int32 a b u c d v tx ty w, a-d in 16.16 fixed point. A player shows stored pixel (x, y) at
    (a x + c y + tx, b x + d y + ty); FFmpeg reads only the turn, from a-d."""
    at = blob.index(b"tkhd") + 4  # the version byte
    assert blob[at] == 0, "a version-1 tkhd (64-bit times) is laid out differently"
    return at + 4 + 20 + 16


def write_turned_clip(path: Path, matrix: tuple[int, int, int, int] | None) -> Path:
    """marked_pixels as a short mpeg4 mp4 whose track header says to show it through the matrix [[a, b], [c, d]]
    (None: as written, the identity): the bytes a phone writes, set here without relying on any writer's sign."""
    data.write_video(path, np.stack([marked_pixels()] * FRAMES), 25, codec="mpeg4")
    if matrix is not None:
        blob = bytearray(path.read_bytes())
        at = tkhd_matrix_at(blob)
        assert struct.unpack(">9i", blob[at:at + 36]) == (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)  # identity
        a, b, c, d = matrix
        blob[at:at + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
        path.write_bytes(blob)
    return path


# -----------------------------------------------------------------------------
# Clips with a display rotation

# The matrix, and where the stored top-left (white) and top-right (grey) blocks are shown through it. [0 1; -1 0]
# maps (x, y) to (-y, x): the stored top row (y = 0) becomes the right-hand column, top to bottom, so the clip is
# shown turned 90 degrees clockwise. That is what a phone held upright records (ffprobe's old 'rotate=90' tag;
# FFmpeg and PyAV's VideoFrame.rotation read it as -90, counter-clockwise positive).
PHONE = (0, 1, -1, 0)
TURNS = [
    (None, "top-left", "top-right"),
    (PHONE, "top-right", "bottom-right"),  # 90 clockwise
    ((0, -1, 1, 0), "bottom-left", "top-left"),  # 90 counter-clockwise: (x, y) -> (y, -x)
    ((-1, 0, 0, -1), "bottom-right", "bottom-left"),  # 180
]


@pytest.mark.parametrize("matrix, white_at, grey_at", TURNS, ids=["none", "90cw", "90ccw", "180"])
def test_rotated_mp4_probes_and_loads_as_displayed(tmp_path, matrix, white_at, grey_at):
    path = write_turned_clip(tmp_path / "clip.mp4", matrix)
    quarter = matrix is not None and matrix[0] == 0
    width, height = (H, W) if quarter else (W, H)
    assert data.probe(path) == (width, height, FRAMES, 25.0)
    video = data.load_sample(data.Sample("d", path, "", width, height, FRAMES))  # at its displayed size: no resize
    assert video.shape == (3, FRAMES, height, width)
    assert corner_of(video, "white") == white_at and corner_of(video, "grey") == grey_at
    assert torch.equal(video[:, 0], video[:, -1])  # every frame turned, not only the first


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="PyAV < 18 cannot write a display rotation")
def test_rotated_mkv_without_a_frame_count_probes_as_displayed(tmp_path):
    # Matroska carries no frame count: probe counts by decoding, and takes the rotation from the same pass
    path = tmp_path / "clip.mkv"
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(-90)  # PyAV's sign: counter-clockwise, so 90 clockwise, the phone's turn
        for _ in range(FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(marked_pixels(), format="rgb24")))
        container.mux(stream.encode(None))
    assert data.probe(path) == (H, W, FRAMES, 25.0)
    video = data.load_sample(data.Sample("d", path, "", H, W, FRAMES))
    assert corner_of(video, "white") == "top-right" and corner_of(video, "grey") == "bottom-right"


def test_quarter_turns_rounds_any_angle_to_counter_clockwise_quarters():
    assert [data.quarter_turns(d) for d in (0, 90, -90, 180, -180, 270, 89.6, -91, 30, -44)] == \
        [0, 1, 3, 2, 2, 3, 1, 3, 0, 0]


# -----------------------------------------------------------------------------
# Images with an EXIF Orientation tag

# Orientation, where stored top-left (white) and top-right (grey) are shown, from the EXIF 2.3 wording of each
# value ("the 0th row is the visual right-hand side of the image, and the 0th column is the visual top" for 6:
# the stored top row becomes the right-hand column, top to bottom). 5-8 show the image as portrait.
EXIF = [
    (None, "top-left", "top-right"),
    (1, "top-left", "top-right"),
    (2, "top-right", "top-left"),  # mirrored
    (3, "bottom-right", "bottom-left"),  # 180
    (4, "bottom-left", "bottom-right"),  # flipped upside down
    (5, "top-left", "bottom-left"),  # transposed
    (6, "top-right", "bottom-right"),  # turned 90 clockwise: a phone photo taken upright
    (7, "bottom-right", "top-right"),  # transversed
    (8, "bottom-left", "top-left"),  # turned 90 counter-clockwise
]


def write_exif_image(path: Path, orientation: int | None) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # the Orientation tag
    Image.fromarray(marked_pixels()).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize("orientation, white_at, grey_at", EXIF)
def test_exif_orientation_is_applied_by_probe_and_load_sample(tmp_path, suffix, orientation, white_at, grey_at):
    path = write_exif_image(tmp_path / f"photo{suffix}", orientation)
    width, height = (H, W) if orientation in (5, 6, 7, 8) else (W, H)
    assert data.probe(path) == (width, height, 1, 25.0)
    image = data.load_sample(data.Sample("d", path, "", width, height, 1))
    assert image.shape == (3, 1, height, width)
    assert corner_of(image, "white") == white_at and corner_of(image, "grey") == grey_at


def test_portrait_sources_get_portrait_buckets(tmp_path):
    # the bucket comes from probe and the frames from load_sample: both must see the source the same way round
    (tmp_path / "clips").mkdir()
    (tmp_path / "images").mkdir()
    write_turned_clip(tmp_path / "clips" / "phone.mp4", PHONE)
    write_exif_image(tmp_path / "images" / "phone.jpg", 6)
    for kind, folder in (("video", "clips"), ("image", "images")):
        (tmp_path / folder / "phone.txt").write_text("a phone held upright")
        ds = config.parse_dataset({"id": kind, "instance_data_dir": str(tmp_path / folder), "dataset_type": kind,
                                 "resolution": 128, "video": {"num_frames": FRAMES}}, "test", 0, log=lambda m: None)
        report = data.Report(tmp_path / "out" / f"{kind}.json", False)
        [sample] = data.plan_samples(ds, 2, 0, report)
        assert sample.height > sample.width, (kind, sample)
        video = data.load_sample(sample)
        assert video.shape == (3, sample.frames, sample.height, sample.width)
        assert corner_of(video, "white") == "top-right" and corner_of(video, "grey") == "bottom-right"


# -----------------------------------------------------------------------------
# Broken images: BadFile (moved aside with delete_problematic_images), never another exception

def first_half(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


BROKEN = {
    "notes.png": lambda: b"this is a text file, not a picture\n" * 20,
    "notes.jpg": lambda: b"\xff\xd8 and then nothing a JPEG decoder wants",
    "half.png": lambda: first_half(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8), "PNG"),
    "half.jpg": lambda: first_half(marked_pixels(), "JPEG"),  # FFmpeg decoded this one, grey-filled, as good
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_are_bad_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN[name]())
    with pytest.raises(data.BadFile, match=r"not an image Pillow recognizes|could not decode \("):
        data.probe(path)
    with pytest.raises(data.BadFile):
        data.load_sample(data.Sample("d", path, "", W, H, 1))


def test_a_vanished_image_is_the_os_error_not_a_bad_file(tmp_path):
    # plan_samples skips an OSError without judging the file broken (nothing to move aside)
    with pytest.raises(FileNotFoundError):
        data.probe(tmp_path / "gone.png")


# -----------------------------------------------------------------------------
# Images without a tag: the pixels FFmpeg gave before

@pytest.mark.parametrize("name, pixels", [
    ("rgb.png", np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)),
    ("rgba.png", np.random.default_rng(2).integers(0, 256, (H, W, 4), dtype=np.uint8)),
    ("grey.png", np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)),
    ("grey16.png", np.random.default_rng(4).integers(0, 65536, (H, W), dtype=np.uint16)),  # Pillow alone clips
    ("rgb.bmp", np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)),
])
def test_untagged_lossless_images_load_as_ffmpeg_decoded_them(tmp_path, name, pixels):
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    with av.open(str(path)) as container:
        before = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert data.probe(path) == (W, H, 1, 25.0)
    image = data.load_sample(data.Sample("d", path, "", W, H, 1))
    assert torch.equal(image[:, 0], torch.from_numpy(before).permute(2, 0, 1).float().div(127.5).sub(1.0))
