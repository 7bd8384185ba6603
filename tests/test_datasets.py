import pytest

from vidret_lib.datasets import load_dataset, write_dataset

TINY = {"n_train": 2, "n_val": 1, "n_test": 1, "family_size": 1}  # a ShapeMotion of 4 videos


def test_roundtrip_and_caption_video_index(tmp_path):
    caps = [
        {"video_id": "b", "sentence": "x"},
        {"video_id": "a", "sentence": "y"},
        {"video_id": "b", "sentence": "x"},
    ]
    videos = [{"video_id": "a", "path": "videos/a.mp4"}, {"video_id": "b", "path": "/abs/b.mp4"}]
    ds = write_dataset(tmp_path, {"name": "t", "version": "1"}, videos, {"train": caps})
    sp = ds.split("train")
    assert sp.video_ids == ["b", "a"]
    assert sp.caption_video.tolist() == [0, 1, 0]
    assert sp.video_captions() == [[0, 2], [1]]
    assert ds.info["splits"]["train"] == {"videos": 2, "captions": 3, "distinct_sentences": 2}
    assert ds.video_path("a") == tmp_path / "videos" / "a.mp4"
    assert str(ds.video_path("b")) == "/abs/b.mp4"
    assert load_dataset(tmp_path).split_names() == ["train"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_dataset(tmp_path)
    ds = write_dataset(tmp_path, {"name": "t"}, [{"video_id": "a", "path": "a.mp4"}], {"test": []})
    with pytest.raises(FileNotFoundError, match=r"has splits \['test'\]"):
        ds.split("val")
    with pytest.raises(ValueError, match="lacks"):
        write_dataset(tmp_path, {"name": "t"}, [{"video_id": "a"}], {})


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    from vidret_lib.cache import save_json

    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):  # the umask at write time counts
        old = os.umask(umask)
        try:
            path = save_json(tmp_path / f"x{umask}.json", {})
        finally:
            os.umask(old)
        assert oct(path.stat().st_mode & 0o777) == oct(mode)


def test_save_json_keeps_number_arrays_on_one_line_and_round_trips(tmp_path):
    import json
    import random

    from vidret_lib.cache import load_json, save_json

    rng = random.Random(0)
    scalars = [lambda: rng.random() * 10 ** rng.randint(-9, 9), lambda: rng.randint(-5, 5), lambda: True,
               lambda: None, lambda: "a [1,  2]", lambda: {"k": [1, 2]}, lambda: []]
    for _ in range(300):
        obj = {"v": [rng.choice(scalars)() for _ in range(rng.randint(0, 6))], "nested": [[rng.random()], []]}
        path = save_json(tmp_path / "x.json", obj)
        assert load_json(path) == obj
        text = path.read_text()
        assert "a [1,  2]" in text or "a [1,  2]" not in json.dumps(obj), "strings must be left alone"
    save_json(path, {"hits": [1, 0, 1], "scores": [0.5, -1e-05]})
    assert '"hits": [1, 0, 1]' in path.read_text() and '"scores": [0.5, -1e-05]' in path.read_text()


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from vidret_lib.cache import atomic_write

    target = tmp_path / "x.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("done"))
    assert (tmp_path / "new.txt").read_text() == "done" and len(list(tmp_path.iterdir())) == 2


def test_damaged_npz_is_named(tmp_path):
    import numpy as np

    from vidret_lib.cache import load_npz, save_npz

    path = save_npz(tmp_path / "f.npz", a=np.arange(3))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"f\.npz is unreadable .*delete it to recompute"):
        load_npz(path)
    with pytest.raises(FileNotFoundError, match="absent.npz does not exist"):
        load_npz(tmp_path / "absent.npz")


@pytest.mark.parametrize("damaged", ["videos.json", "splits/test.json"])
def test_a_damaged_layout_file_says_what_rebuilds_it_and_that_works(tmp_path, damaged):
    from data_prep.synthetic import generate

    root = generate(tmp_path / "ds", "smoke", **TINY).root
    (root / damaged).write_text("{ half")
    with pytest.raises(ValueError, match=rf"{damaged} is not valid JSON .*delete {root / 'dataset.json'} "
                                         rf"\(or the whole folder {root}\) and run again") as err:
        load_dataset(root).split("test")
    assert "delete it to recompute" not in str(err.value)
    (root / "dataset.json").unlink()  # what the message says
    generate(root, "smoke", **TINY)  # what prepare_dataset does when dataset.json is absent
    assert load_dataset(root).split("test").sentences
