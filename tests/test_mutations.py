"""The suite stays sharp: every named bug in `tests/mutations.py` makes its tests fail.

Each mutation runs in its own temporary copy of the repository, one after another (a few minutes
on two cores). A mutation that survives means a test that used to catch that bug no longer does;
a mutation whose text no longer occurs exactly once means the code moved and the mutation must
be updated to it.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests import mutations


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_mutation_still_applies(mutation):
    """The text each mutation replaces occurs exactly once in the code as it is now."""
    mutations.check_applies(mutation)


def test_mutation_names_are_unique():
    names = [m.name for m in mutations.MUTATIONS]
    assert len(names) == len(set(names))


def test_a_harmless_change_survives_and_a_moved_one_is_refused():
    """The check itself can fail: a change that is no bug passes its subset ("survived"), and a
    mutation whose text occurs other than once is refused before anything runs."""
    guard = mutations.by_name(["scheduler_version_guard"])[0]
    harmless = dataclasses.replace(guard, name="harmless", new="        # a comment\n" + guard.old)
    assert mutations.run(harmless).status == "survived"
    moved = dataclasses.replace(harmless, old="self.allocator.free(seq.pages)")  # occurs twice
    with pytest.raises(mutations.MutationError, match="occurs 2 times"):
        mutations.check_applies(moved)


@pytest.mark.slow
def test_every_mutation_is_caught():
    """Runs every mutation's test subset on a mutated copy: each must fail in a test named for
    it (not pass, not error out some other way)."""
    results = mutations.run_all()
    report = "\n".join(mutations.format_result(r) for r in results)
    assert all(r.status == "caught" for r in results), report
