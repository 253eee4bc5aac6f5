"""`pipeline store selection`: what every registered policy chooses on a store's rows, without a student and
without a teacher: each teacher's share of the rows, how often the chosen teacher is right, how often a tie of the
score decided, and, given each sample's group and the group's expert teacher, how often the expert was chosen.

A policy's weights here come from the same `Policy.weights` as in training (pipeline.policies), on the store's eval
view (view 0) of the blocks every teacher finished; `random-batch` takes each block as one batch.
"""

import numpy as np
import pandas as pd
import torch

from pipeline.config import whole_numbers
from pipeline.errors import PipelineError
from pipeline.evidence import store_evidence
from pipeline.policies import POLICIES


def read_groups(path: str, ids: list[str]) -> np.ndarray:
    """Each of the data set's `ids` -> its group in the CSV file at `path` (columns: id, group; a header row
    naming them), "" for an id the file leaves out; an id of the file that is not in the data set stops."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as error:
        raise PipelineError(f"--groups {path}: cannot read it as CSV ({error})") from None
    if list(table.columns[:2]) != ["id", "group"]:
        raise PipelineError(f"--groups {path}: the header must start with the columns id,group (the data set's sample "
                            f"id, its group); it has {','.join(table.columns)}")
    known = set(ids)
    strangers = [i for i in table["id"] if i not in known]
    if strangers:
        raise PipelineError(f"--groups {path}: {len(strangers)} id(s) are not samples of this split, first "
                            f"{strangers[0]!r}; ids are as the data set names them (`sample_id`), e.g. {ids[0]!r}")
    group = dict(zip(table["id"], table["group"]))
    return np.array([group.get(i, "") for i in ids], dtype=object)


def sample_groups(data, class_groups: tuple[str, ...] = ()) -> pd.DataFrame:
    """The id,group table of a data set split, for --groups: with `class_groups` (NAME=CLASS,CLASS,...) each
    sample's group is its class's, "" where none names it; without, the data set's own groups (its domains)."""
    ids = [data.sample_id(i) for i in range(len(data))]
    if not class_groups:
        groups = data.groups
        if groups is None:
            raise PipelineError(f"data set {data.info.name!r} has no groups of its own (shape-domains has its domains); "
                                "name groups of classes with --class-group NAME=0,1,2")
        return pd.DataFrame({"id": ids, "group": groups})
    of_class = {}
    for entry in class_groups:
        name, sep, listed = entry.partition("=")
        classes = whole_numbers(f"--class-group {entry}", listed, "low=0,1,2,3,4") if sep and name else []
        if not classes or not all(0 <= c < data.info.num_classes for c in classes):
            raise PipelineError(f"--class-group {entry}: write NAME=CLASS,CLASS,... with classes 0 to "
                                f"{data.info.num_classes - 1}, e.g. low=0,1,2,3,4")
        for c in classes:
            if of_class.setdefault(c, name) != name:
                raise PipelineError(f"--class-group: class {c} is in two groups, {of_class[c]} and {name}")
    return pd.DataFrame({"id": ids, "group": [of_class.get(int(label), "") for label in data.labels]})


def parse_experts(pairs: tuple[str, ...], teachers: list[str], groups: np.ndarray | None) -> dict[str, int]:
    """GROUP=TEACHER pairs -> {group: the teacher's index in `teachers`}."""
    if pairs and groups is None:
        raise PipelineError("--expert needs --groups: the file that says each sample's group")
    experts = {}
    known = sorted(set(groups) - {""}) if groups is not None else []
    for pair in pairs:
        group, sep, teacher = pair.partition("=")
        if not sep:
            raise PipelineError(f"--expert {pair}: write GROUP=TEACHER, e.g. --expert {known[0] if known else 'g'}="
                                f"{teachers[0]}")
        if group not in known:
            raise PipelineError(f"--expert {pair}: no sample has group {group!r}; the groups file names: "
                                f"{', '.join(known)}")
        if teacher not in teachers:
            raise PipelineError(f"--expert {pair}: {teacher!r} is not a teacher of the store; choose one of: "
                                f"{', '.join(teachers)}")
        experts[group] = teachers.index(teacher)
    return experts


def full_weights(weights: torch.Tensor, chosen: list[int], teachers: int) -> torch.Tensor:
    """(B, len(chosen)) weights over a policy's teachers -> (B, teachers) over all of the store's."""
    out = torch.zeros(len(weights), teachers)
    out[:, chosen] = weights.float()
    return out


def selection(store, seed: int = 0, temperature: float = 0.1, groups: np.ndarray | None = None,
              experts: dict[str, int] | None = None) -> dict:
    """Per policy: each teacher's share of the rows, the share of the weight on a right teacher, the share of
    rows a tie decided, and (with `groups`, each store row's group, and `experts`) the share of the weight on
    the row's group's expert. Plus the rows counted and how many of them some teacher gets right."""
    teachers = store.teachers
    if not teachers:
        raise PipelineError(f"store {store.location} holds no teachers; run `pipeline extract-teachers` first")
    if not store.finished_blocks(teachers):
        raise PipelineError(f"store {store.location} has no block that every teacher finished; finish it with its "
                            "`pipeline extract-teachers` command")
    policies = {}
    for name in POLICIES.names():
        policy = POLICIES.get(name)(temperature)
        chosen = [teachers.index(t) for t in policy.teachers(store, teachers)]
        policies[name] = (policy.fit(store, [teachers[m] for m in chosen], seed), chosen)
    totals = {name: {"shares": torch.zeros(len(teachers)), "right": 0.0, "tie": 0, "expert": 0.0}
              for name in policies}
    rows = any_right = expert_rows = 0
    for evidence in store_evidence(store, teachers, maps=True):
        expert = None
        if experts:
            expert = torch.tensor([experts.get(g, -1) for g in groups[evidence.rows.numpy()]])
            expert_rows += int((expert >= 0).sum())
        for name, (policy, chosen) in policies.items():
            part = evidence.of_teachers(chosen)
            weights = full_weights(policy.weights(part), chosen, len(teachers))
            total = totals[name]
            total["shares"] += weights.sum(0)
            total["right"] += float((weights * evidence.correct).sum())
            total["tie"] += int(policy.choice(part)[1].sum())
            if expert is not None:
                total["expert"] += float(weights[expert >= 0].gather(1, expert[expert >= 0, None]).sum())
        rows += len(evidence.y)
        any_right += int(evidence.correct.any(1).sum())
    if not rows:
        raise PipelineError(f"store {store.location} has no readable row in the blocks every teacher finished")
    return {"store": str(store.location), "rows": rows, "any_right": any_right / rows, "teachers": teachers,
            "expert_rows": expert_rows if experts else None,
            "policies": {name: {"shares": dict(zip(teachers, (t["shares"] / rows).tolist())), "right": t["right"] / rows,
                                "tie": t["tie"] / rows, "expert": t["expert"] / expert_rows if expert_rows else None}
                         for name, t in totals.items()}}


def selection_text(report: dict) -> str:
    """The report as a table, a row per policy."""
    table = pd.DataFrame([{"policy": name, **{f"share {t}": s for t, s in p["shares"].items()}, "right": p["right"],
                           "tie": p["tie"], **({"expert": p["expert"]} if report["expert_rows"] is not None else {})}
                          for name, p in report["policies"].items()])
    lines = [f"store {report['store']}: {report['rows']} rows (eval view of the blocks every teacher finished); "
             f"some teacher is right on {report['any_right']:.2%} of them", "",
             table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), "",
             "share: the teacher's share of the policy's weight; right: the share of the weight on a teacher that "
             "classifies the row right; tie: the share of rows where two or more teachers tied on the policy's "
             "score and the larger Y chose"
             + (f"; expert: the share of the weight on the expert of the row's group ({report['expert_rows']} rows "
                "have a group with an expert)" if report["expert_rows"] is not None else "")]
    return "\n".join(lines)
