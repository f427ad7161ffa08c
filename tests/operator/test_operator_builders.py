"""The worker Deployment and Service builders (plain functions, no cluster)."""

from __future__ import annotations

from pathlib import Path

import yaml

from flexllm.operator import builders
from flexllm.operator.config import OperatorConfig
from flexllm.operator.models import InferenceServiceSpec

REPO = Path(__file__).resolve().parents[2]
CONFIG = OperatorConfig(redis_url="redis://r:6379/0", redis_secret="redis-auth", adapter_pvc="adapters",
                        worker_image="worker:1", worker_service_account="flexllm-worker")


def spec(**changes) -> InferenceServiceSpec:
    raw = yaml.safe_load((REPO / "examples" / "inferenceservice.yaml").read_text())["spec"]
    return InferenceServiceSpec.model_validate({**raw, **changes})


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_worker_args_carry_model_service_redis_and_engine_limits():
    args = builders.worker_args("smollm2", "team-a", spec())
    assert args[0] == "serve"
    assert flag(args, "--model") == "smollm2-135m"
    assert flag(args, "--service") == "team-a.smollm2"
    assert flag(args, "--redis-url") == "$(FLEXLLM_REDIS_URL)"
    assert flag(args, "--adapter-dir") == "/adapters"
    assert flag(args, "--port") == "8000"
    assert [flag(args, f) for f in ("--max-tokens-per-batch", "--kv-cache-fraction", "--max-loras",
                                    "--max-lora-rank", "--ttft-ms", "--tpot-ms")] == ["2048", "0.5", "4", "64",
                                                                                       "5000", "75"]


def test_pvc_model_is_mounted_read_only():
    deployment = builders.build_deployment("m", "ns", spec(model={"uri": "pvc://models/llama-3.1-8b"}), CONFIG)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert flag(container["args"], "--model") == "/models/llama-3.1-8b"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


def test_data_roots_are_the_image_examples_and_the_datasets_pvc_read_only():
    pod = builders.build_deployment("m", "ns", spec(), CONFIG)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["FLEXLLM_DATA_DIR"] == "examples" and not any(v["name"] == "datasets" for v in pod["volumes"])
    with_pvc = OperatorConfig(**{**CONFIG.__dict__, "dataset_pvc": "team-data", "data_dirs": ()})
    pod = builders.build_deployment("m", "ns", spec(), with_pvc)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["FLEXLLM_DATA_DIR"] == "/data"
    assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "team-data", "readOnly": True}} in pod["volumes"]
    assert {"name": "datasets", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]


def test_file_model_and_pinned_adapters():
    args = builders.worker_args("m", "ns", spec(model={"uri": "file:///data/qwen"},
                                                adapters=[{"name": "sql", "uri": "pvc://a/sql"}]))
    assert flag(args, "--model") == "/data/qwen"
    assert flag(args, "--adapter") == "sql=/pinned/a/sql"


def test_pinned_adapters_pvcs_are_mounted_read_only_once_per_claim():
    pinned = [{"name": "sql", "uri": "pvc://team.adapters/sql/v3"}, {"name": "chat", "uri": "pvc://team.adapters/chat"},
              {"name": "local", "uri": "file:///opt/adapters/local"}]
    deployment = builders.build_deployment("m", "ns", spec(adapters=pinned), CONFIG)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--adapter"] == [
        "sql=/pinned/team.adapters/sql/v3", "chat=/pinned/team.adapters/chat", "local=/opt/adapters/local"]
    claims = [v for v in pod["volumes"] if v["name"].startswith("pinned-")]
    assert claims == [{"name": "pinned-0", "persistentVolumeClaim": {"claimName": "team.adapters", "readOnly": True}}]
    assert {"name": "pinned-0", "mountPath": "/pinned/team.adapters", "readOnly": True} in container["volumeMounts"]


def test_worker_args_are_flags_of_the_real_flexllm_serve():
    """The rendered args parse with the worker's own CLI parser, to the values the spec asks for."""
    from flexllm.worker.cli import build_parser

    rendered = builders.worker_args("smollm2", "team-a", spec(adapters=[{"name": "sql", "uri": "pvc://a/sql"}],
                                                               slo={"ttftMs": 800, "tpotMs": 50.5},
                                                               engine={"policy": "temporal", "maxFinetuneTokens": 64}))
    args = build_parser().parse_args(rendered)
    assert args.command == "serve"
    assert (args.model, args.dtype, args.service, args.adapter_dir, args.port) == (
        "smollm2-135m", "auto", "team-a.smollm2", "/adapters", 8000)
    assert args.redis_url == "$(FLEXLLM_REDIS_URL)"  # expanded by the kubelet from the container env
    assert (args.max_tokens_per_batch, args.kv_cache_fraction, args.max_loras, args.max_lora_rank) == (
        256, 0.5, 4, 16)  # the engine's own defaults: this spec sets none
    assert (args.ttft_ms, args.tpot_ms, args.policy, args.max_finetune_tokens) == (800, 50.5, "temporal", 64)
    assert args.adapter == ["sql=/pinned/a/sql"]


def test_deployment_requests_gpus_and_runs_non_root():
    deployment = builders.build_deployment("smollm2", "ns", spec(resources={"gpus": 2, "memory": "24Gi"}), CONFIG)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"memory": "24Gi"},
                                      "limits": {"nvidia.com/gpu": "2", "memory": "24Gi"}}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "flexllm-worker"
    assert container["image"] == "worker:1"


def test_cpu_only_worker_has_no_gpu_limit_or_toleration():
    pod = builders.build_deployment("m", "ns", spec(resources={"gpus": 0}), CONFIG)["spec"]["template"]["spec"]
    assert "limits" not in pod["containers"][0]["resources"]
    assert "tolerations" not in pod


def test_redis_password_comes_from_the_secret_and_adapters_from_the_pvc():
    pod = builders.build_deployment("m", "ns", spec(), CONFIG)["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}
    assert env["FLEXLLM_REDIS_URL"]["value"] == "redis://r:6379/0"
    assert {"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters"}} in pod["volumes"]
    no_pvc = builders.build_deployment("m", "ns", spec(), OperatorConfig())["spec"]["template"]["spec"]
    assert {"name": "adapters", "emptyDir": {}} in no_pvc["volumes"]
    assert "REDIS_PASSWORD" not in {e["name"] for e in no_pvc["containers"][0]["env"]}


def test_spec_change_changes_the_pod_template():
    before = builders.build_deployment("m", "ns", spec(), CONFIG)["spec"]["template"]
    after = builders.build_deployment("m", "ns", spec(engine={"maxTokensPerBatch": 512}), CONFIG)["spec"]["template"]
    assert before != after


def test_service_selects_the_worker_pods():
    deployment = builders.build_deployment("m", "ns", spec(), CONFIG)
    service = builders.build_service("m", "ns")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    assert service["spec"]["ports"][0]["port"] == builders.PORT
    assert builders.endpoint("ns", "m") == "http://m.ns.svc:8000/v1"


def test_worker_pod_drains_within_its_grace_period():
    pod = builders.build_deployment("m", "ns", spec(), CONFIG)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    drain = float(flag(container["args"], "--drain-seconds"))
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(builders.PRESTOP_S)]
    assert pod["terminationGracePeriodSeconds"] >= builders.PRESTOP_S + drain + 5  # + the API's close


def test_hf_model_and_adapter_uris_reach_the_worker_with_the_token_from_its_secret():
    hf = spec(model={"uri": "hf://org/tiny@v1"}, adapters=[{"name": "chat", "uri": "hf://org/tiny-lora"}])
    args = builders.worker_args("m", "ns", hf)
    assert flag(args, "--model") == "hf://org/tiny@v1" and flag(args, "--adapter") == "chat=hf://org/tiny-lora"
    with_token = OperatorConfig(hf_token_secret="hf-auth", hf_token_secret_key="hf-token")
    for config, expected in ((with_token, {"name": "hf-auth", "key": "hf-token"}), (OperatorConfig(), None)):
        pod = builders.build_deployment("m", "ns", hf, config)["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert (env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] if expected else env.get("HF_TOKEN")) == expected
    assert OperatorConfig.from_env({"FLEXLLM_HF_TOKEN_SECRET": "s"}) == OperatorConfig(hf_token_secret="s")


def test_worker_args_carry_concurrency_and_prefix_caching():
    args = builders.worker_args("m", "ns", spec())
    assert flag(args, "--max-num-seqs") == "64" and "--enable-prefix-caching" in args
    off = builders.worker_args("m", "ns", spec(engine={"maxNumSeqs": 8, "enablePrefixCaching": False}))
    assert flag(off, "--max-num-seqs") == "8" and "--no-enable-prefix-caching" in off
    from flexllm.worker.cli import build_parser

    parsed = build_parser().parse_args(off)  # the worker's own parser takes every flag the operator writes
    assert parsed.max_num_seqs == 8 and parsed.enable_prefix_caching is False
