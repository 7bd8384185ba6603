"""ShapeMotion generator: determinism, resumability, and every property the notebooks rely on."""
import hashlib
import shutil
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import decord
import numpy as np
import pytest
from scipy.stats import spearmanr

from data_prep import grammar
from data_prep.synthetic import (
    PRESETS,
    REVERSE_MOTION,
    STATIC_FACTS,
    VARIABLE_ATTRIBUTES,
    SyntheticConfig,
    build_annotations,
    describe,
    generate,
    main,
    quantise,
    relevance,
    static_pairs,
)
from data_prep.synthetic_render import render_frames
from vidret_lib.cache import load_json
from vidret_lib.datasets import load_dataset

SMOKE = PRESETS["smoke"]
SIZE = PRESETS["default"].frame_size  # the annotations fixture uses the default preset
ATTRIBUTE_KEYS = ("shape", "colour", "size", "motion", "background", "event")


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    assert main(["--size", "smoke", "--seed", "0", "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def annotations():
    """Annotations of the default size (no rendering): enough videos for rate statistics."""
    videos, splits, pairs = build_annotations(PRESETS["default"], seed=0)
    return {v["video_id"]: v for v in videos}, splits, pairs


# ------------------------------------------------------------------ determinism and resume


def test_same_seed_same_bytes_other_seed_differs(smoke, tmp_path):
    again = generate(tmp_path / "again", "smoke", seed=0).root
    first, second = all_files(smoke), all_files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []  # JSON and mp4 bytes alike
    other, _, _ = build_annotations(SMOKE, seed=1)
    assert [v["attributes"] for v in other] != [v["attributes"] for v in load_json(smoke / "videos.json")]


def test_resume_after_kill_gives_same_result(smoke, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(smoke, work)
    videos = sorted((work / "videos").glob("*.mp4"))
    (work / "dataset.json").unlink()  # killed before the end
    for p in videos[:3]:
        p.unlink()
    # a half-written temp file from the kill, where a finished video is missing
    (work / "videos" / f".{videos[0].name}.k1ll3d.tmp").write_bytes(videos[5].read_bytes()[:500])
    videos[3].write_bytes(videos[3].read_bytes()[:700])  # truncated video
    shutil.copy(videos[6], videos[4])  # a valid mp4, but of another video (wrong key)
    untouched = videos[7].stat().st_mtime_ns
    with pytest.raises(FileNotFoundError):
        load_dataset(work)  # without dataset.json the root is not a dataset yet
    generate(work, "smoke", seed=0)
    assert all_files(work) == all_files(smoke)  # includes: no leftover temp file
    assert videos[7].stat().st_mtime_ns == untouched  # finished videos are not redone


def test_worker_processes_write_the_same_bytes(smoke, tmp_path):
    def digests(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "videos").glob("*.mp4"))}

    one = digests(generate(tmp_path / "one", "smoke", seed=0, workers=1).root)
    two = digests(generate(tmp_path / "two", "smoke", seed=0, workers=2).root)
    assert len(one) == SMOKE.n_train + SMOKE.n_val + SMOKE.n_test and one == two == digests(smoke)
    with pytest.raises(ValueError, match="workers=0"):
        generate(tmp_path / "zero", "smoke", workers=0)


def test_refuses_to_mix_two_datasets(smoke, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(smoke, work)
    with pytest.raises(FileExistsError, match="another --out"):
        generate(work, "smoke", seed=1)


def test_bad_config_and_size_are_named():
    with pytest.raises(ValueError, match="twin_rate=1.5"):
        SyntheticConfig(twin_rate=1.5)
    with pytest.raises(ValueError, match="frame_size=95"):
        SyntheticConfig(frame_size=95)
    with pytest.raises(TypeError, match="n_trian"):
        generate("/nonexistent", "smoke", n_trian=3)
    with pytest.raises(ValueError, match="huge"):
        generate("/nonexistent", "huge")


# ------------------------------------------------------------------ layout, splits, videos


def test_default_size_has_power(annotations):
    """Issue 12: a 1,000-video test gallery with 2 captions each, 500 val videos, train as before."""
    cfg = PRESETS["default"]
    assert (cfg.n_train, cfg.n_val, cfg.n_test) == (600, 500, 1000) and cfg.sampled_frames == 8
    videos, splits, _ = annotations
    per_video = {name: Counter(r["video_id"] for r in rows) for name, rows in splits.items()}
    assert [len(per_video[s]) for s in ("train", "val", "test")] == [600, 500, 1000]
    assert {s: set(c.values()) for s, c in per_video.items()} == {"train": {5}, "val": {1}, "test": {2}}
    with pytest.raises(ValueError, match="captions_per_test_video=0"):
        SyntheticConfig(captions_per_test_video=0)


def test_layout_splits_and_caption_counts(smoke):
    ds = load_dataset(smoke)
    assert ds.name == "shapemotion-smoke" and ds.info["seed"] == 0 and ds.info["version"]
    assert ds.info["config"]["n_train"] == SMOKE.n_train and set(ds.info["properties"])
    split_videos = {}
    for name, n in (("train", SMOKE.n_train), ("val", SMOKE.n_val), ("test", SMOKE.n_test)):
        sp = ds.split(name)
        per_video = Counter(sp.caption_video_ids)
        expected = {"train": SMOKE.captions_per_train_video, "val": 1, "test": SMOKE.captions_per_test_video}[name]
        assert len(sp.video_ids) == n and set(per_video.values()) == {expected}
        assert all(ds.videos[v]["split"] == name for v in sp.video_ids)
        split_videos[name] = set(sp.video_ids)
    assert not split_videos["train"] & split_videos["val"]
    assert not split_videos["train"] & split_videos["test"]
    assert not split_videos["val"] & split_videos["test"]
    families = defaultdict(set)
    for v in ds.videos.values():
        families[v["family"]].add(v["split"])
    assert all(len(s) == 1 for s in families.values())  # a family never straddles splits


def test_videos_decode_with_decord(smoke):
    ds = load_dataset(smoke)
    for vid in list(ds.videos)[:4]:
        vr = decord.VideoReader(str(ds.video_path(vid)))
        assert len(vr) == SMOKE.n_frames
        assert vr.get_avg_fps() == SMOKE.fps
        assert vr[0].shape == (SMOKE.frame_size, SMOKE.frame_size, 3)
    # CLIP4Clip's 1-fps rule reads frames 0, fps, 2 fps, ... while they exist
    assert len(range(0, SMOKE.n_frames, SMOKE.fps)) == SMOKE.sampled_frames


# ------------------------------------------------------------------ temporal-only twins


def test_twins_have_equal_frame_means_and_different_captions(smoke):
    ds = load_dataset(smoke)
    twins = [(v["video_id"], v["twin"]) for v in ds.videos.values() if v["varied"] == "base" and v["twin"]]
    assert twins, "the smoke set should hold at least one time-reversed twin"
    captions = defaultdict(set)
    for split in ("train", "val", "test"):
        sp = ds.split(split)
        for vid, text in zip(sp.caption_video_ids, sp.sentences):
            captions[vid].add(text)
    picks = list(range(0, SMOKE.n_frames, SMOKE.fps))
    for a_id, b_id in twins:
        a = decord.VideoReader(str(ds.video_path(a_id))).get_batch(picks).asnumpy().astype(float)
        b = decord.VideoReader(str(ds.video_path(b_id))).get_batch(picks).asnumpy().astype(float)
        same_order = np.abs(a - b).mean()
        assert np.abs(a.mean(0) - b.mean(0)).mean() < 0.25 * same_order  # only codec noise left
        assert np.abs(a - b[::-1]).mean() < 0.35 * same_order
        attrs_a, attrs_b = ds.videos[a_id]["attributes"], ds.videos[b_id]["attributes"]
        assert attrs_a != attrs_b and not captions[a_id] & captions[b_id]


def test_twin_is_exact_time_reversal_with_reversed_facts(annotations):
    videos, _, _ = annotations
    twins = [(v, videos[v["twin"]]) for v in videos.values() if v["varied"] == "base" and v["twin"]]
    kinds = Counter(base["attributes"]["event"] for base, _ in twins)
    assert len(twins) > 50 and set(kinds) == {"none", "colour_change", "sequence"}
    for base, twin in twins[:20]:
        frames = render_frames(base["scene"], SIZE, 9)
        assert np.array_equal(render_frames(twin["scene"], SIZE, 9), frames[::-1])
    for base, twin in twins:
        a, b = base["attributes"], twin["attributes"]
        assert b["motion"] == REVERSE_MOTION[a["motion"]] and a != b
        if a["event"] == "colour_change":
            assert (b["colour"], b["colour2"]) == (a["colour2"], a["colour"])
        if a["event"] == "sequence":
            swapped = (a["shape2"], a["colour2"], a["shape"], a["colour"])
            assert (b["shape"], b["colour"], b["shape2"], b["colour2"]) == swapped
        for key in ("size", "background", "distractors", "event"):
            assert a[key] == b[key]
        facts = ["colour", "shape", "motion", "event"] if a["event"] != "none" else ["shape", "motion"]
        text_a = grammar.caption(np.random.default_rng(0), a, facts)
        text_b = grammar.caption(np.random.default_rng(0), b, facts)
        assert text_a != text_b
        title_a = grammar.title(np.random.default_rng(0), a, ["colour", "shape"])
        assert title_a == grammar.title(np.random.default_rng(0), b, ["colour", "shape"])  # title can't tell


# ------------------------------------------------------------------ near-duplicate families


def test_family_variants_differ_from_base_in_exactly_one_attribute(annotations):
    videos, _, _ = annotations
    bases = {v["family"]: v for v in videos.values() if v["varied"] == "base"}
    varied = Counter()
    for v in videos.values():
        if v["varied"] in ("base", "time") or v["family"] not in bases:
            continue
        a, b = bases[v["family"]]["attributes"], v["attributes"]
        assert [k for k in a if a[k] != b[k]] == [v["varied"]]
        varied[v["varied"]] += 1
        if len(varied) <= len(VARIABLE_ATTRIBUTES) and varied[v["varied"]] == 1:
            base_frames = render_frames(bases[v["family"]]["scene"], SIZE, 5)
            assert not np.array_equal(render_frames(v["scene"], SIZE, 5), base_frames)  # visible
    assert set(varied) == set(VARIABLE_ATTRIBUTES)
    sizes = Counter(v["family"] for v in videos.values())
    assert Counter(sizes.values()).most_common(1)[0][0] == PRESETS["default"].family_size


def test_describe_matches_scene():
    scene = {
        "background": "grey", "phase": 0, "reversed": True, "distractors": [{}],
        "actor": {"shape": "star", "colour": "red", "size": "small", "motion": "up", "path": {},
                  "event": "sequence", "shape2": "circle", "colour2": "blue"},
    }
    assert describe(scene) == {
        "shape": "circle", "colour": "blue", "size": "small", "motion": "down", "background": "grey",
        "distractors": 1, "event": "sequence", "shape2": "star", "colour2": "red",
    }


# ------------------------------------------------------------------ captions and titles


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


def test_underspecified_share_follows_rate():
    for rate in (0.0, 0.1, 0.4):
        cfg = replace(PRESETS["default"], n_train=300, n_val=50, n_test=50, underspecified_rate=rate)
        _, splits, _ = build_annotations(cfg, seed=3)
        rows = [c for rows in splits.values() for c in rows]
        share = _share(c["underspecified"] for c in rows)
        assert abs(share - rate) < 0.03, (rate, share)
        vague = [c for c in rows if c["underspecified"]]
        assert all(c["facts"] == [] and c["sentence"] in grammar.UNDERSPECIFIED for c in vague)
        if rate:  # few distinct sentences spread over many videos: the source of hub videos
            assert len({c["video_id"] for c in vague}) > 5 * len({c["sentence"] for c in vague})


def test_title_missing_and_wrong_rates(annotations):
    videos, _, _ = annotations
    for missing, wrong in ((0.15, 0.15), (0.0, 0.5), (0.3, 0.0)):
        cfg = replace(PRESETS["default"], n_val=100, n_test=200, title_missing_rate=missing, title_wrong_rate=wrong)
        records, _, _ = build_annotations(cfg, seed=1)
        assert abs(_share(v["title"] is None for v in records) - missing) < 0.04
        assert abs(_share(v["title_correct"] is False for v in records) - wrong) < 0.04
    motion_words = ("left", "right", "clockwise", "bounc", "diagonal", "still", " up", "down")
    for v in videos.values():
        if v["title"] is None:
            assert v["title_correct"] is None and v["title_facts"] == []
            continue
        title = v["title"].lower().replace("_", " ").replace("/", " ")
        assert not any(w in f" {title}" for w in motion_words)  # titles never give motion
        a = v["attributes"]
        named = {a["colour"], a["shape"]}
        if v["title_correct"]:
            assert all(word in title for word in named)
        else:
            wrong_fact = v["title_wrong_fact"]
            assert wrong_fact in v["title_facts"] and a[wrong_fact] not in title.split()


def test_needs_vision_flags(annotations):
    videos, splits, _ = annotations
    rows = [c for rows in splits.values() for c in rows]
    for c in rows:
        v = videos[c["video_id"]]
        reliable = set(v["title_facts"]) - {v["title_wrong_fact"]}
        assert c["needs_vision"] == bool(set(c["facts"]) - reliable)
        if "motion" in c["facts"] or "event" in c["facts"]:
            assert c["needs_vision"]
    share = _share(c["needs_vision"] for c in rows)
    assert 0.5 < share < 0.98  # most queries need vision, some are answerable from the title


def test_captions_state_exactly_their_facts(annotations):
    videos, splits, _ = annotations
    checked = Counter()
    for c in splits["train"][:1500]:
        if c["underspecified"] or "event" in c["facts"]:
            continue  # an event names a second colour
        a, words = videos[c["video_id"]]["attributes"], f" {c['sentence']} "
        says_colour = any(f" {w} " in words for w in grammar.COLOUR_WORDS[a["colour"]])
        says_motion = any(p in words for forms in grammar.MOTION_PHRASES[a["motion"]] for p in forms)
        says_shape = any(f" {w}" in words for w in grammar.SHAPE_WORDS[a["shape"]])
        assert says_shape and says_colour == ("colour" in c["facts"]), c
        assert says_motion == ("motion" in c["facts"]), c
        checked[("colour" in c["facts"], "motion" in c["facts"])] += 1
    assert len(checked) == 4  # every combination occurs


# ------------------------------------------------------------------ graded pair labels


def test_relevance_examples():
    a = {
        "shape": "circle", "colour": "red", "size": "small", "motion": "left_to_right",
        "background": "black", "distractors": 0, "event": "none", "shape2": None, "colour2": None,
    }
    far = {
        **a, "shape": "star", "colour": "blue", "size": "large", "motion": "static",
        "background": "white", "event": "colour_change", "colour2": "green",
    }
    assert relevance(a, a) == 1.0 and relevance(a, far) == 0.0
    assert relevance(a, {**a, "distractors": 2}) == 1.0  # distractors are not part of the meaning
    assert relevance(a, {**a, "motion": "right_to_left"}) == pytest.approx(1 - 0.25 / 2)
    assert relevance(a, {**a, "size": "medium"}) == pytest.approx(1 - 0.1 / 2)
    change = {**a, "event": "colour_change", "colour2": "blue"}
    # shared colours {red} of {red, blue}: half the colour weight; same event, other colour: half
    assert relevance(a, change) == pytest.approx(1 - 0.2 / 2 - 0.1)
    assert relevance(change, {**change, "colour": "blue", "colour2": "red"}) == pytest.approx(1 - 0.1 / 2)
    assert [quantise(x, 20) for x in (0.0, 0.02, 0.03, 1.0)] == [0.0, 0.0, round(1 / 19, 6), 1.0]


def test_pair_labels_graded_noisy_and_within_splits(annotations):
    videos, _, pairs = annotations
    levels = PRESETS["default"].label_levels
    grid = {round(k / (levels - 1), 6) for k in range(levels)}
    for split, rows in pairs.items():
        assert len(rows) > 5 * sum(v["split"] == split for v in videos.values())
        labels = np.array([r["label"] for r in rows])
        assert set(labels) <= grid
        keys = {tuple(sorted((r["video_a"], r["video_b"]))) for r in rows}
        assert len(keys) == len(rows) and all(a != b for a, b in keys)
        assert all(videos[a]["split"] == split == videos[b]["split"] for a, b in keys)
        pair_attrs = [(videos[r["video_a"]]["attributes"], videos[r["video_b"]]["attributes"]) for r in rows]
        overlap = [sum(a[k] == b[k] for k in ATTRIBUTE_KEYS) for a, b in pair_attrs]
        clean = [relevance(a, b) for a, b in pair_attrs]
        assert spearmanr(labels, overlap)[0] > 0.75
        assert spearmanr(labels, clean)[0] > 0.9
        noisy = np.array([quantise(c, levels) for c in clean]) != labels
        assert 0.1 < noisy.mean() < 0.9  # label noise moves some labels off the clean level
    train = np.array([r["label"] for r in pairs["train"]])
    assert len(set(train)) == levels
    assert np.histogram(train, bins=4, range=(0, 1))[0].min() > 0.03 * len(train)  # spread over the range


def test_zero_noise_gives_clean_labels():
    cfg = replace(SMOKE, label_noise=0.0)
    videos, _, pairs = build_annotations(cfg, seed=0)
    attrs = {v["video_id"]: v["attributes"] for v in videos}
    for r in pairs["train"]:
        assert r["label"] == quantise(relevance(attrs[r["video_a"]], attrs[r["video_b"]]), cfg.label_levels)


# ------------------------------------------------------------------ still image-text pairs (pretraining)


def test_static_pairs_are_deterministic_and_of_their_own_stream():
    frames, captions, facts = static_pairs(30, 0, SMOKE, captions_per_image=2)
    assert frames.shape == (30, SMOKE.frame_size, SMOKE.frame_size, 3) and frames.dtype == np.uint8
    again = static_pairs(30, 0, SMOKE, captions_per_image=2)
    assert (again[0] == frames).all() and again[1:] == (captions, facts)
    longer = static_pairs(40, 0, SMOKE, captions_per_image=2)  # image i does not depend on n_images
    assert (longer[0][:30] == frames).all() and longer[1][:30] == captions
    other = static_pairs(30, 1, SMOKE, captions_per_image=2)
    assert other[1] != captions and not (other[0] == frames).all()
    assert all(len(set(c)) == 2 for c in captions)  # distinct captions per image
    videos, splits, _ = build_annotations(SMOKE, seed=0)
    sentences = {r["sentence"] for rows in splits.values() for r in rows}
    assert len(sentences & {c for cs in captions for c in cs}) < 5  # another stream, not the dataset's text
    with pytest.raises(ValueError, match="n_images >= 1"):
        static_pairs(0, 0, SMOKE)


def test_static_captions_state_only_static_facts():
    _, captions, facts = static_pairs(300, 0, PRESETS["default"], captions_per_image=2)
    motion_phrases = [p for phrases in grammar.MOTION_PHRASES.values() for pair in phrases for p in pair]
    event_words = {"then", "turns", "turning", "becoming", "replaced", "changes", "changing", "drift", "drifts"}
    stated = Counter()
    for caps, fs in zip(captions, facts):
        for text, f in zip(caps, fs):
            assert "shape" in f and set(f) <= set(STATIC_FACTS), (text, f)
            stated.update(f)
            assert not any(p in text for p in motion_phrases) and not set(text.split()) & event_words, text
            backgrounds = [p for ps in grammar.BACKGROUND_PHRASES.values() for p in ps]
            assert any(p in text for p in backgrounds) == ("background" in f), text
    assert set(stated) == set(STATIC_FACTS)  # every static fact is said somewhere
    with pytest.raises(ValueError, match="a still image shows no motion"):
        grammar.caption(np.random.default_rng(0), {"shape": "star", "motion": "up"}, ["shape", "motion"], still=True)
