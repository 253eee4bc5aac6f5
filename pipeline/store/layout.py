"""Where everything lives in a teacher store, and which versions of the format and of the extraction made it.

The only module that spells an array's key ("labels", "teachers/<name>/cam", ...): the rest of the code
asks `teacher_array`, `owner_of` and their neighbours; what makes two stores or teachers the same, and its
`fingerprint`. The store's history of formats is in CHANGELOG.md.
"""

import hashlib
import json

# The layout of the files: raised when a store of the old version can no longer be read as it is.
FORMAT = "teacher-store"
VERSION = 8
FORMER_FORMATS = ("teacher-cache",)  # earlier names of this format: such a store is ours to replace
# The values a store holds: raised by hand whenever extraction computes different values from the same teachers
# and data (another Grad-CAM, rounding, view rendering, ...). tests/test_golden_store.py fails when the values of a
# small store move while this stayed; a store made by another extraction version is stale.
EXTRACTION_VERSION = 1

TEACHERS = "teachers"  # the group holding one folder per teacher
SHARED_ARRAYS = ("labels", "images", "valid", "view_boxes", "view_flips")  # one per store; "images" only for small images
SAMPLE_ARRAYS = ("valid", "view_boxes", "view_flips")  # written by extraction with each block, before its teachers'
VIEWED_SHARED = ("view_boxes", "view_flips")  # shared arrays with a view axis (as every teacher array has)
DIGESTS = "shard_digests"  # per block, the digest of each of its shard files (the store's and each teacher's)
PROGRESS = "progress"  # per block, whether a teacher finished it
TEACHER_MARKS = (PROGRESS, DIGESTS)  # a teacher's arrays that hold no rows
SCORE_FIELDS = ("cam", "cam_max", "cam_class", "y_prob", "o_prob", "attention", "attention_max")
TOPK_FIELDS = ("logits", "logit_classes", "tail_logsumexp")  # `--logits topk:K` stores these instead of all C logits
# what makes two stores the same (the root fingerprint covers these attributes)
STORE_IDENTITY = ("dataset", "target", "block_size", "logits", "views", "extraction_version")
# what makes two teachers of one store the same (the split they were judged on included)
TEACHER_IDENTITY = ("arch", "weights_sha256", "target_layer", "transform", "heldout_data")


def teacher_array(name: str, field: str) -> str:
    """The key of teacher `name`'s array `field` (a score, a logit field or one of its marks)."""
    return f"{TEACHERS}/{name}/{field}"


def teacher_arrays(names: list[str] | tuple[str, ...], fields: list[str] | tuple[str, ...]) -> list[str]:
    """The keys of `fields` of each of `names`, teacher by teacher."""
    return [teacher_array(name, field) for name in names for field in fields]


def owner_of(array: str) -> str | None:
    """The teacher whose array `array` is, or None for the store's shared arrays."""
    return array.split("/")[1] if array.startswith(f"{TEACHERS}/") else None


def field_of(array: str) -> str:
    """The array's own name: "cam" of "teachers/<name>/cam", "labels" of "labels"."""
    return array.rsplit("/", 1)[-1]


def digest_array(owner: str | None) -> str:
    """The array of the digests of `owner`'s shard files: a teacher's, or (None) the shared arrays'."""
    return DIGESTS if owner is None else teacher_array(owner, DIGESTS)


def is_digests(array: str) -> bool:
    return field_of(array) == DIGESTS


def is_viewed(array: str) -> bool:
    """Whether `array` has a view axis: every teacher array but its marks, and the views' own."""
    return array in VIEWED_SHARED or (owner_of(array) is not None and field_of(array) not in TEACHER_MARKS)


def fingerprint(record: dict) -> str:
    """The SHA-256 of an identity record (STORE_IDENTITY's or TEACHER_IDENTITY's attributes), in hex."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
