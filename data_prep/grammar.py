"""Captions and titles for ShapeMotion videos: a small grammar with paraphrases.

A video's *attributes* (see :func:`data_prep.synthetic.describe`) are turned into text:

- :func:`caption` says a chosen subset of *facts* (``FACTS``) in one of several sentence
  frames, with synonyms for words and phrases, in MSR-VTT's style (lower case, no final
  full stop). It never states a fact outside the subset, so the generator records exactly
  what each caption claims.
- :func:`underspecified_caption` says nothing specific ("a shape is shown"): these captions
  fit every video and pile up on a few *hub* videos.
- :func:`title` is the short text attached to a video (the text modality of MBVR). It
  names only appearance facts (``TITLE_FACTS``), never the motion or the order of events,
  and names the two colours (or objects) of an event in alphabetical order, so a title
  never tells a video from its time-reversed twin.

Every choice is drawn from the ``numpy.random.Generator`` passed in, so text is
deterministic given the generator's state.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# What a caption can state, in the order phrases appear.
FACTS = ("size", "colour", "shape", "motion", "event", "background", "distractors")
# What a title can state (appearance only: a single frame shows them).
TITLE_FACTS = ("size", "colour", "shape", "background")

SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "cyan": ("cyan", "turquoise"),
    "pink": ("pink",),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big"),
}

# (third person singular, -ing form) paraphrases of each motion.
MOTION_PHRASES = {
    "left_to_right": (
        ("moves from left to right", "moving from left to right"),
        ("slides to the right", "sliding to the right"),
        ("travels across the screen from left to right", "travelling across the screen from left to right"),
    ),
    "right_to_left": (
        ("moves from right to left", "moving from right to left"),
        ("slides to the left", "sliding to the left"),
        ("travels across the screen from right to left", "travelling across the screen from right to left"),
    ),
    "up": (
        ("moves up", "moving up"),
        ("rises from the bottom to the top", "rising from the bottom to the top"),
        ("floats upward", "floating upward"),
    ),
    "down": (
        ("moves down", "moving down"),
        ("falls from the top to the bottom", "falling from the top to the bottom"),
        ("sinks downward", "sinking downward"),
    ),
    "diagonal_up": (
        ("moves diagonally up and to the right", "moving diagonally up and to the right"),
        ("drifts toward the top right corner", "drifting toward the top right corner"),
    ),
    "diagonal_down": (
        ("moves diagonally down and to the left", "moving diagonally down and to the left"),
        ("drifts toward the bottom left corner", "drifting toward the bottom left corner"),
    ),
    "clockwise": (
        ("circles clockwise", "circling clockwise"),
        ("moves around in a clockwise circle", "moving around in a clockwise circle"),
    ),
    "counterclockwise": (
        ("circles counterclockwise", "circling counterclockwise"),
        ("moves around in an anticlockwise circle", "moving around in an anticlockwise circle"),
    ),
    "bouncing": (
        ("bounces up and down", "bouncing up and down"),
        ("keeps bouncing", "bouncing"),
        ("hops in place", "hopping in place"),
    ),
    "static": (
        ("stays still", "staying still"),
        ("does not move", "not moving"),
        ("sits in one place", "sitting in one place"),
    ),
}
# Event phrases after a motion phrase / on their own; {c1} {c2} colours, {second} the second object.
EVENT_AFTER_MOTION = {
    "colour_change": (
        (", then turns {c2}", " and then turning {c2}"),
        (" and changes colour to {c2}", " and changing colour to {c2}"),
        (" before becoming {c2}", " before becoming {c2}"),
    ),
    "sequence": (
        (", then turns into {second}", " and then turning into {second}"),
        (" and is then replaced by {second}", " and then being replaced by {second}"),
    ),
}
EVENT_ALONE = {
    "colour_change": (
        ("turns {c2}", "turning {c2}"),
        ("changes colour to {c2}", "changing colour to {c2}"),
    ),
    "sequence": (
        ("turns into {second}", "turning into {second}"),
        ("is replaced by {second}", "being replaced by {second}"),
    ),
}
BACKGROUND_PHRASES = {
    "black": ("on a black background", "against a black backdrop"),
    "white": ("on a white background", "against a white backdrop"),
    "grey": ("on a grey background", "on a gray background"),
    "striped": ("on a striped background", "over a pattern of stripes"),
    "checkered": ("on a checkered background", "over a checkerboard"),
}
DISTRACTOR_PHRASES = {
    1: ("while another small shape drifts nearby", "with one other small shape around"),
    2: ("while two other small shapes drift around", "with a couple of small shapes around"),
}
# The phrases a still image can show (no drifting): captions of ``caption(..., still=True)``.
STILL_DISTRACTOR_PHRASES = {n: tuple(p for p in phrases if "drift" not in p) for n, phrases in DISTRACTOR_PHRASES.items()}
UNDERSPECIFIED = (
    "a shape is shown",
    "an object on the screen",
    "a simple animation of a shape",
    "a geometric shape",
    "there is a shape in the video",
    "a video of an object",
)
# Sentence frames: "plain" is "<np> <verb phrase>", "fronted" puts the background first
# (when stated); the frames in LEADS open with their words and use the -ing forms.
LEADS = {"video_of": "a video of", "there_is": "there is", "we_see": "we see"}
FRAMES = ("plain", "plain", "fronted", *LEADS)


def _pick(rng: np.random.Generator, options: tuple) -> Any:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(rng: np.random.Generator, shape: str, colour: str | None, size: str | None) -> str:
    """``"a small red circle"``: the shape with the given (optional) size and colour words.

    Example:
        >>> noun_phrase(np.random.default_rng(0), "triangle", "orange", None)
        'an orange triangle'
    """
    words = []
    if size is not None:
        words.append(_pick(rng, SIZE_WORDS[size]))
    if colour is not None:
        words.append(_pick(rng, COLOUR_WORDS[colour]))
    words.append(_pick(rng, SHAPE_WORDS[shape]))
    return f"{_article(words[0])} {' '.join(words)}"


def _verb_phrase(rng: np.random.Generator, attrs: dict, facts: set[str], ing: bool) -> str:
    """Motion and/or event phrase (possibly empty) in 3rd person singular or -ing form."""
    form = 1 if ing else 0
    text = ""
    if "motion" in facts:
        text = _pick(rng, MOTION_PHRASES[attrs["motion"]])[form]
    if "event" in facts and attrs["event"] != "none":
        table = EVENT_AFTER_MOTION if text else EVENT_ALONE
        second = None
        if attrs["event"] == "sequence":
            second = noun_phrase(rng, attrs["shape2"], attrs["colour2"], None)
        c2 = _pick(rng, COLOUR_WORDS[attrs["colour2"]])
        text += _pick(rng, table[attrs["event"]])[form].format(c2=c2, second=second)
    return text


def caption(rng: np.random.Generator, attrs: dict, facts: list[str] | tuple[str, ...], still: bool = False) -> str:
    """A caption of a video stating exactly ``facts`` (a subset of ``FACTS``, with "shape").

    ``still=True`` describes a still image: it refuses "motion" and "event" among ``facts``
    and words distractors without movement (``STILL_DISTRACTOR_PHRASES``).

    Example:
        >>> attrs = {"shape": "circle", "colour": "red", "size": "small", "motion": "left_to_right",
        ...          "event": "colour_change", "shape2": None, "colour2": "blue",
        ...          "background": "black", "distractors": 0}
        >>> text = caption(np.random.default_rng(1), attrs, ["colour", "shape", "motion"])
        >>> "red" in text and "right" in text and "blue" not in text
        True
    """
    facts = set(facts)
    unknown = facts - set(FACTS)
    if unknown or "shape" not in facts:
        raise ValueError(f"caption facts {sorted(facts)} must include 'shape' and only names from {FACTS}")
    if still and facts & {"motion", "event"}:
        raise ValueError(f"a still image shows no motion or event; got caption facts {sorted(facts)}")
    frame = _pick(rng, FRAMES)
    subject = noun_phrase(
        rng,
        attrs["shape"],
        attrs["colour"] if "colour" in facts else None,
        attrs["size"] if "size" in facts else None,
    )
    verb = _verb_phrase(rng, attrs, facts, ing=frame in LEADS)
    clause = f"{subject} {verb}" if verb else subject
    if frame in LEADS:
        clause = f"{LEADS[frame]} {clause}"
    phrases = []
    if "background" in facts:
        phrases.append(_pick(rng, BACKGROUND_PHRASES[attrs["background"]]))
    if "distractors" in facts and attrs["distractors"] > 0:
        table = STILL_DISTRACTOR_PHRASES if still else DISTRACTOR_PHRASES
        phrases.append(_pick(rng, table[attrs["distractors"]]))
    if frame == "fronted" and "background" in facts:  # "on a black background, a red circle ..."
        return " ".join([f"{phrases[0]}, {clause}", *phrases[1:]])
    return " ".join([clause, *phrases])


def underspecified_caption(rng: np.random.Generator) -> str:
    """A caption true of every video, e.g. ``"a shape is shown"`` (makes hub videos)."""
    return _pick(rng, UNDERSPECIFIED)


def _object_name(attrs: dict, facts: set[str]) -> str:
    """Title words for the object(s); an event's two colours/objects in alphabetical order."""
    size = f"{attrs['size']} " if "size" in facts else ""
    colour = "colour" in facts
    if attrs["event"] == "sequence":
        objects = sorted([(attrs["colour"], attrs["shape"]), (attrs["colour2"], attrs["shape2"])])
        names = [f"{c} {s}" if colour else s for c, s in objects]
        return f"{size}{names[0]} and {names[1]}"
    if attrs["event"] == "colour_change" and colour:
        return f"{size}{'/'.join(sorted([attrs['colour'], attrs['colour2']]))} {attrs['shape']}"
    return f"{size}{attrs['colour'] + ' ' if colour else ''}{attrs['shape']}"


def title(rng: np.random.Generator, attrs: dict, facts: list[str] | tuple[str, ...]) -> str:
    """A video title naming ``facts`` (a subset of ``TITLE_FACTS`` with "shape"), in one of a few styles.

    Example:
        >>> attrs = {"shape": "square", "colour": "blue", "size": "large", "motion": "up",
        ...          "event": "colour_change", "shape2": None, "colour2": "red",
        ...          "background": "grey", "distractors": 1}
        >>> t = title(np.random.default_rng(0), attrs, ["colour", "shape", "background"])
        >>> "blue/red" in t.lower().replace("_", " ") and "grey" in t.lower()
        True
    """
    facts = set(facts)
    if "shape" not in facts or facts - set(TITLE_FACTS):
        raise ValueError(f"title facts {sorted(facts)} must include 'shape', all from {TITLE_FACTS}")
    name = _object_name(attrs, facts)
    bg = attrs["background"] if "background" in facts else None
    style = int(rng.integers(4))
    if style == 0:
        return (name + (f" on {bg}" if bg else "")).title()
    if style == 1:
        return f"{name} animation" + (f" ({bg} background)" if bg else "")
    if style == 2:
        return "_".join([*name.replace("/", "_").split(), *([bg] if bg else [])]) + ".mp4"
    return f"clip: {name}" + (f" on {bg}" if bg else "")
