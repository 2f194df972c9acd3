"""Video reading (vlm_compress.video): frame sampling rules, both decoders, and every way a source can be unreadable.

Clips are written here with ``write_video`` (PyAV); nothing is downloaded. Both backends are required (the lock
installs decord and PyAV): a missing one fails its tests rather than skipping them.
"""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from vlm_compress.video import VideoClip, VideoReadError, read_video, sample_indices, write_video

BACKENDS = ["decord", "av"]
FPS = 8.0
COUNT = 24


def flat_frames(count=COUNT, size=32):
    """Frame i is the flat grey i * 10, so each frame read back says which frame it is."""
    return np.stack([np.full((size, size, 3), i * 10, np.uint8) for i in range(count)])


def noisy_frames(count=COUNT, size=32):
    """Greys 30 + 8 i plus noise (never clipped): packets big enough that cutting a file in half cuts through
    frames."""
    noise = np.random.default_rng(0).integers(-30, 30, (count, size, size, 3))
    return (30 + 8 * np.arange(count)[:, None, None, None] + noise).astype(np.uint8)


def frame_ids(frames):
    """Which flat grey of ``flat_frames`` each frame is (nearest multiple of 10)."""
    return np.rint(frames.reshape(len(frames), -1).mean(1) / 10).astype(int)


def nearest(frames, written):
    """For each frame read, the index of the written frame it is closest to (mean absolute difference)."""
    diff = np.abs(frames[:, None].astype(int) - written[None].astype(int)).reshape(len(frames), len(written), -1)
    return diff.mean(-1).argmin(1)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "flat.mp4"
    write_video(path, flat_frames(), fps=FPS)
    return path


def cut(tmp_path, frames, ext, fraction=0.5):
    """A clip written as ``ext`` and cut to ``fraction`` of its bytes."""
    full = tmp_path / f"full.{ext}"
    write_video(full, frames, fps=FPS)
    data = full.read_bytes()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


# --- sample_indices -------------------------------------------------------------------------------------------


def test_uniform_sampling_is_linspace_rounded_down():
    assert sample_indices(24, 8).tolist() == [0, 3, 6, 9, 13, 16, 19, 23]  # 0, 3.29, 6.57, 9.86, 13.1, ...
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(100, 3).tolist() == [0, 49, 99]
    assert sample_indices(7, 1).tolist() == [0]
    assert sample_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(24, 8).dtype == np.int64


def test_more_frames_than_the_video_holds_returns_each_frame_once():
    assert sample_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(1, 32).tolist() == [0]


def test_fps_sampling_takes_one_frame_every_source_fps_over_fps_frames():
    assert sample_indices(24, fps=2, source_fps=8).tolist() == [0, 4, 8, 12, 16, 20]
    # step 8 / 3: floor(0, 2.67, 5.33, 8, 10.67, 13.33, 16, 18.67, 21.33)
    assert sample_indices(24, fps=3, source_fps=8).tolist() == [0, 2, 5, 8, 10, 13, 16, 18, 21]
    # step 10 / 3: frame 10 is exactly 3 steps in, not 9.999…
    assert sample_indices(30, fps=3, source_fps=10).tolist() == [0, 3, 6, 10, 13, 16, 20, 23, 26]
    assert sample_indices(30, fps=1, source_fps=29.97).tolist() == [0, 29]
    assert sample_indices(6, fps=16, source_fps=8).tolist() == [0, 1, 2, 3, 4, 5]  # faster than the source: all


def test_fps_sampling_over_num_frames_falls_back_to_uniform():
    # 2 fps gives 6 frames, more than 3: the uniform 3 instead, linspace(0, 23, 3) → 0, 11.5, 23 (LLaVA-Video's cap)
    assert sample_indices(24, 3, fps=2, source_fps=8).tolist() == [0, 11, 23]
    assert sample_indices(24, 6, fps=2, source_fps=8).tolist() == [0, 4, 8, 12, 16, 20]  # at the cap: kept
    assert sample_indices(24, 10, fps=2, source_fps=8).tolist() == [0, 4, 8, 12, 16, 20]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": -3}, "num_frames"),
    ({"num_frames": 2.5}, "num_frames"),
    ({"fps": 0, "source_fps": 8}, "fps"),
    ({"fps": -1, "source_fps": 8}, "fps"),
    ({"fps": 2}, "source_fps"),
    ({}, "num_frames.*fps"),
])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(24, **kwargs)


def test_no_frames_to_sample_is_a_read_error():
    with pytest.raises(VideoReadError, match="no decodable frame"):
        sample_indices(0, 8)


# --- reading --------------------------------------------------------------------------------------------------


def test_both_backends_are_installed():
    import av  # noqa: F401
    import decord  # noqa: F401


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_read_returns_the_sampled_frames(clip_path, backend):
    clip = read_video(clip_path, 8, backend=backend)
    assert isinstance(clip, VideoClip) and clip.backend == backend and len(clip) == 8
    assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == [0, 3, 6, 9, 13, 16, 19, 23] and clip.indices.dtype == np.int64
    assert clip.fps == FPS and clip.num_source_frames == COUNT
    np.testing.assert_allclose(clip.timestamps, clip.indices / FPS)
    assert clip.timestamps.dtype == np.float64
    assert frame_ids(clip.frames).tolist() == clip.indices.tolist()
    assert np.abs(clip.frames.astype(int) - flat_frames()[clip.indices]).mean() < 3  # lossy codec


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_read_and_asking_for_too_many_frames(clip_path, backend):
    clip = read_video(clip_path, fps=2, backend=backend)
    assert clip.indices.tolist() == [0, 4, 8, 12, 16, 20] and frame_ids(clip.frames).tolist() == clip.indices.tolist()
    np.testing.assert_allclose(clip.timestamps, [0, 0.5, 1, 1.5, 2, 2.5])
    assert read_video(clip_path, 3, fps=2, backend=backend).indices.tolist() == [0, 11, 23]
    everything = read_video(clip_path, 100, backend=backend)
    assert everything.indices.tolist() == frame_ids(everything.frames).tolist() == list(range(COUNT))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_and_file_objects_read_like_the_path(clip_path, backend):
    by_path = read_video(clip_path, 6, backend=backend)
    data = clip_path.read_bytes()
    with open(clip_path, "rb") as file:
        by_file = read_video(file, 6, backend=backend)
    sources = (data, bytearray(data), io.BytesIO(data), str(clip_path))
    for clip in [*(read_video(source, 6, backend=backend) for source in sources), by_file]:
        assert np.array_equal(clip.frames, by_path.frames) and np.array_equal(clip.indices, by_path.indices)
        assert clip.fps == by_path.fps and clip.num_source_frames == by_path.num_source_frames


@pytest.mark.parametrize("ext", ["mp4", "mkv", "avi"])
def test_backends_agree(tmp_path, ext):
    path = tmp_path / f"clip.{ext}"
    frames = noisy_frames()
    write_video(path, frames, fps=FPS)
    for kwargs in ({"num_frames": 8}, {"fps": 3}, {"num_frames": 100}):
        dec, av = (read_video(path, backend=backend, **kwargs) for backend in BACKENDS)
        assert dec.indices.tolist() == av.indices.tolist() and dec.num_source_frames == av.num_source_frames == COUNT
        assert dec.fps == av.fps == FPS
        diff = np.abs(dec.frames.astype(int) - av.frames.astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 2  # two FFmpeg builds (decord bundles its own): bit-exact here
        assert nearest(av.frames, frames).tolist() == av.indices.tolist()


def test_auto_prefers_decord(clip_path):
    assert read_video(clip_path, 2).backend == "decord"


def test_to_pil(clip_path):
    images = read_video(clip_path, 3, backend="av").to_pil()
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB"
                                    for im in images)


# --- unreadable sources: an error naming the file, never a partial clip ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        read_video(missing, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_and_text_are_not_videos(tmp_path, backend):
    png = tmp_path / "still.png"
    Image.fromarray(flat_frames(1)[0]).save(png)
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    for source, name in ((png, "still.png"), (text, "notes.txt")):
        with pytest.raises(VideoReadError, match=name):
            read_video(source, 4, backend=backend)
    for data in (png.read_bytes(), text.read_bytes()):
        with pytest.raises(VideoReadError, match="bytes"):
            read_video(data, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sources(tmp_path, backend):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.mp4.*empty"):
        read_video(empty, 4, backend=backend)
    with pytest.raises(VideoReadError, match="empty"):
        read_video(b"", 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_container_with_no_frames(tmp_path, backend):
    import av

    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as container:  # a header and a stream, then nothing
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    assert path.stat().st_size > 0
    with pytest.raises(VideoReadError, match="zero.mp4"):
        read_video(path, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mp4_cut_in_half(tmp_path, backend):
    path = cut(tmp_path, noisy_frames(), "mp4")  # the index (moov) is written last: nothing is left to read
    with pytest.raises(VideoReadError, match="cut.mp4.*truncated"):
        read_video(path, 8, backend=backend)
    with pytest.raises(VideoReadError, match="truncated"):
        read_video(path.read_bytes(), 8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["path", "bytes"])
def test_a_cut_file_that_declares_its_frames_names_the_first_missing_sample(tmp_path, backend, source):
    path = cut(tmp_path, noisy_frames(), "avi")  # AVI's header says 24 frames; half of them are gone
    data = path if source == "path" else path.read_bytes()
    with pytest.raises(VideoReadError, match=r"sampled frame \d+ cannot be decoded .* declares 24 frames") as info:
        read_video(data, 8, backend=backend)
    index = int(str(info.value).split("sampled frame ")[1].split()[0])
    assert index in sample_indices(COUNT, 8) and index < COUNT - 1
    with pytest.raises(VideoReadError, match="sampled frame"):
        read_video(data, fps=2, backend=backend)
    # the rule is about sampled frames: one frame (index 0) lies before the cut and reads
    first = read_video(data, 1, backend=backend)
    assert first.indices.tolist() == [0] and nearest(first.frames, noisy_frames()).tolist() == [0]
    assert first.num_source_frames == COUNT


def test_a_cut_file_with_no_frame_count_reads_as_the_shorter_video(tmp_path):
    path = cut(tmp_path, noisy_frames(), "mkv")  # Matroska declares no count: the frames held are the video
    dec, av = (read_video(path, 100, backend=backend) for backend in BACKENDS)
    assert 0 < av.num_source_frames < COUNT and dec.indices.tolist() == av.indices.tolist()
    written = noisy_frames()
    assert nearest(av.frames, written).tolist() == av.indices.tolist() == nearest(dec.frames, written).tolist()


def test_bad_arguments_fail_before_reading(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(ValueError, match="num_frames"):
        read_video(missing, 0)
    with pytest.raises(ValueError, match="fps"):
        read_video(missing, fps=-2)
    with pytest.raises(ValueError, match="num_frames.*fps"):
        read_video(missing)
    with pytest.raises(ValueError, match="'auto', 'decord', 'av'.*'nope'"):
        read_video(missing, 4, backend="nope")
    with pytest.raises(TypeError, match="source"):
        read_video(12, 4)


# --- missing decoders -----------------------------------------------------------------------------------------


def test_no_decoder_installed(clip_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install 'vlm-compress\[video\]'"):
        read_video(clip_path, 4)


def test_forced_backend_missing_names_it(clip_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(ImportError, match=r"backend='decord' needs decord.*vlm-compress\[video\]"):
        read_video(clip_path, 4, backend="decord")
    assert read_video(clip_path, 4).backend == "av"  # auto falls to PyAV


def test_decord_without_pyav(clip_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # no container probe: decord's own count
    clip = read_video(clip_path, 8, backend="decord")
    assert clip.indices.tolist() == [0, 3, 6, 9, 13, 16, 19, 23] and clip.num_source_frames == COUNT


# --- writing --------------------------------------------------------------------------------------------------


def test_write_video_checks_its_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        write_video(tmp_path / "gray.mp4", np.zeros((2, 32, 32), np.uint8))
    write_video(tmp_path / "list.mkv", list(flat_frames(4)), fps=4)  # a list of [H, W, 3] frames works too
    assert read_video(tmp_path / "list.mkv", 4, backend="av").num_source_frames == 4
