"""Status mapping from the worker's Redis records (plain functions, no cluster)."""

from __future__ import annotations

import json

from flexllm.operator import status as st


def test_progress_maps_counts_percent_and_eta():
    progress = st.progress_status({"step": "30", "total_steps": "200", "loss": "0.123456",
                                   "tokens_per_second": "1234.5", "eta_seconds": "3725"})
    assert progress == {"step": 30, "totalSteps": 200, "percent": 15, "display": "30/200 (15%)",
                        "loss": 0.1235, "tokensPerSecond": 1234.5, "etaSeconds": 3725, "eta": "1h2m"}


def test_progress_tolerates_missing_and_bad_numbers():
    assert st.progress_status({"step": "", "loss": "nan?"}) == {"step": 0}


def test_adapter_versions_keep_the_newest():
    raw = [json.dumps({"version": n, "step": n * 5, "loss": 1.0 / n, "uri": f"/a/v{n}", "time": "t"})
           for n in (1, 2, 3)]
    adapter = st.adapter_status("job", raw, keep=2)
    assert adapter["latestVersion"] == "v3"
    assert adapter["latest"] == "job@v3"
    assert [v["version"] for v in adapter["versions"]] == ["v2", "v3"]
    assert st.adapter_status("job", [], keep=2) is None


def test_job_status_sets_times_once_and_ready_condition():
    running = st.job_status("j", {"phase": "Queued"}, {"phase": "Running", "step": "1"}, [], 5)
    assert running["startTime"] and "completionTime" not in running
    done = st.job_status("j", {**running}, {"phase": "Succeeded", "step": "2"}, [], 5)
    assert "startTime" not in done and done["completionTime"]
    failed = st.job_status("j", running, {"phase": "Failed", "message": "NaN loss"}, [], 5)
    ready = failed["conditions"][-1]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Failed", "NaN loss")


def test_conditions_keep_transition_time_while_status_is_unchanged():
    first = st.merge_conditions([], st.condition("Ready", True, "A"))
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = st.merge_conditions(first, st.condition("Ready", True, "B"))
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["reason"] == "B"
    flipped = st.merge_conditions(first, st.condition("Ready", False, "C"))
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def replica(name: str, adapters: list[str], ready: bool = True, failed: dict | None = None) -> dict:
    return st.replica_entry(name, {"ready": "1" if ready else "0", "adapters": json.dumps(adapters),
                                   "failed": json.dumps(failed or {})})


def test_served_summary_counts_partial_rollouts_on_ready_replicas():
    entries = [replica("a", ["j@v2", "k@v1"]), replica("b", ["j@v3", "k@v1"]), replica("c", ["x@v9"], ready=False)]
    assert st.served_summary(entries) == "j@v2 (1/2),j@v3 (1/2),k@v1"


def test_adapters_condition_reports_failed_hot_loads_and_missing_pinned():
    failed = st.adapters_condition([replica("a", [], failed={"j@v3": "OOM"})], [])
    assert (failed["status"], failed["reason"]) == ("False", "HotLoadFailed")
    assert "a: j@v3: OOM" in failed["message"]
    loading = st.adapters_condition([replica("a", ["sql@v1"]), replica("b", [])], ["sql"])
    assert (loading["status"], loading["reason"]) == ("False", "Loading")
    assert st.adapters_condition([replica("a", ["sql@v1"])], ["sql"])["status"] == "True"


def test_service_status_phase_from_ready_replicas():
    def phase(ready: int, desired: int = 2) -> str:
        return st.service_status(3, {}, desired, ready, [], [], "u")["phase"]

    assert (phase(0), phase(1), phase(2)) == ("Pending", "Degraded", "Ready")
    status = st.service_status(3, {}, 2, 1, [], [], "u")
    assert status["readyDisplay"] == "1/2" and status["observedGeneration"] == 3


def test_changed_fields_skips_equal_values():
    assert st.changed_fields({"a": 1, "b": [1]}, {"a": 1, "b": [2], "c": 3}) == {"b": [2], "c": 3}
