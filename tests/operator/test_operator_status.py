"""Status mapping from the worker's Redis records (plain functions, no cluster)."""

from __future__ import annotations

import datetime

from flexllm.operator import status as st
from flexllm.worker.protocol import AdapterVersion, JobProgress, ReplicaState


def test_progress_maps_counts_percent_and_eta():
    progress = st.progress_status(JobProgress.from_redis({"step": "30", "total_steps": "200", "loss": "0.123456",
                                                          "tokens_per_second": "1234.5", "eta_seconds": "3725"}))
    assert progress == {"step": 30, "totalSteps": 200, "percent": 15, "display": "30/200 (15%)",
                        "loss": 0.1235, "tokensPerSecond": 1234.5, "etaSeconds": 3725, "eta": "1h2m"}


def test_progress_tolerates_missing_and_bad_numbers():
    assert st.progress_status(JobProgress.from_redis({"step": "", "loss": "nan?"})) == {"step": 0}
    assert st.progress_status(JobProgress.from_redis({"step": "2", "loss": "nan", "tokens_per_second": "inf"})) \
        == {"step": 2}


def test_adapter_versions_keep_the_newest():
    versions = [AdapterVersion("job", n, f"/a/v{n}", n * 5, 1.0 / n, "t") for n in (1, 2, 3)]
    adapter = st.adapter_status("job", versions, keep=2)
    assert adapter["latestVersion"] == "v3"
    assert adapter["latest"] == "job@v3"
    assert [v["version"] for v in adapter["versions"]] == ["v2", "v3"]
    assert st.adapter_status("job", [], keep=2) is None


T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def job(old: dict, raw: dict, seconds: float = 0, interval_s: float = 5, generation: int = 1) -> dict:
    return st.job_status("j", generation, old, JobProgress.from_redis(raw), [], 5, at(seconds), interval_s)


def test_job_status_sets_times_once_and_ready_condition():
    running = job({"phase": "Queued"}, {"phase": "Running", "step": "1"})
    assert running["startTime"] == "2026-01-01T12:00:00Z" and "completionTime" not in running
    done = job({**running}, {"phase": "Succeeded", "step": "2"}, seconds=1)
    assert "startTime" not in done and done["completionTime"] == "2026-01-01T12:00:01Z"
    failed = job(running, {"phase": "Failed", "message": "NaN loss"}, generation=3)
    ready = failed["conditions"][-1]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Failed", "NaN loss")
    assert ready["observedGeneration"] == failed["observedGeneration"] == 3
    assert ready["lastTransitionTime"]


def test_trainer_status_is_kubeflows_shape():
    """status.trainerStatus as Kubeflow Trainer's (KEP-2779): percent, ETA, string metrics, a timestamp."""
    status = job({"phase": "Queued"}, {"phase": "Running", "step": "30", "total_steps": "200",
                                       "loss": "0.123456", "tokens_per_second": "1234.5", "eta_seconds": "95"})
    assert status["trainerStatus"] == {
        "progressPercentage": 15,
        "estimatedRemainingSeconds": 95,
        "metrics": [{"name": "loss", "value": "0.1235"}, {"name": "tokensPerSecond", "value": "1234.5"},
                    {"name": "currentStep", "value": "30"}, {"name": "totalSteps", "value": "200"}],
        "lastUpdatedTime": "2026-01-01T12:00:00Z",
    }
    assert status["progress"]["display"] == "30/200 (15%)"  # the printer columns' fields stay
    assert job({"phase": "Queued"}, {"phase": "Running"})["trainerStatus"] == {
        "metrics": [{"name": "currentStep", "value": "0"}], "lastUpdatedTime": "2026-01-01T12:00:00Z"}


def test_progress_is_rewritten_at_most_every_interval_but_phase_changes_pass():
    first = job({"phase": "Queued"}, {"phase": "Running", "step": "1", "total_steps": "10"})
    old = {**first, "phase": "Running"}
    soon = job(old, {"phase": "Running", "step": "2", "total_steps": "10"}, seconds=4.9)
    assert "progress" not in soon and "trainerStatus" not in soon
    assert st.changed_fields(old, soon) == {}  # no patch, no watch event for the dashboards
    later = job(old, {"phase": "Running", "step": "3", "total_steps": "10"}, seconds=5)
    assert later["progress"]["step"] == 3 and later["trainerStatus"]["lastUpdatedTime"] == "2026-01-01T12:00:05Z"
    done = job(old, {"phase": "Succeeded", "step": "10", "total_steps": "10"}, seconds=1)
    assert done["progress"]["display"] == "10/10 (100%)" and done["trainerStatus"]["progressPercentage"] == 100


def test_unchanged_progress_is_not_rewritten_after_the_interval():
    """A long step: no new lastUpdatedTime every interval (a real API server's watch showed one a second)."""
    first = job({"phase": "Queued"}, {"phase": "Running", "step": "1", "total_steps": "10"})
    old = {**first, "phase": "Running"}
    idle = job(old, {"phase": "Running", "step": "1", "total_steps": "10"}, seconds=60)
    assert st.changed_fields(old, idle) == {}


def test_condition_messages_fit_the_schema_bound():
    long = st.condition("Ready", False, "Failed", "x" * 40000)
    assert len(long["message"]) == st.MAX_CONDITION_MESSAGE


def test_conditions_keep_transition_time_while_status_is_unchanged():
    first = st.merge_conditions([], st.condition("Ready", True, "A"))
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = st.merge_conditions(first, st.condition("Ready", True, "B"))
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["reason"] == "B"
    flipped = st.merge_conditions(first, st.condition("Ready", False, "C"))
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def replica(name: str, adapters: list[str], ready: bool = True, failed: dict | None = None) -> dict:
    return st.replica_entry(name, ReplicaState(tuple(adapters), ready, failed=failed or {}))


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
