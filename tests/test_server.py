"""`lfmodel server` (real PostgreSQL from the wheel + mlflow server on loopback) and the stage
preflight against a tracking server that is not there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, run
from test_sweep import LFMODEL, _env, _stop_group

from lfmodel.server import free_port


def _ctrl_c_as_in_a_terminal() -> None:
    """A test run started in the background by a non-interactive shell inherits SIGINT
    ignored (bash does that for `cmd &` without job control), and so would the server: give
    it the default disposition a terminal's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(data, port) -> subprocess.Popen:
    return subprocess.Popen([LFMODEL, "server", "--data", str(data), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _start(data, port) -> subprocess.Popen:
    proc = _launch(data, port)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("export MLFLOW_TRACKING_URI="):
            return proc
    _stop_group(proc)
    raise AssertionError("".join(out))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_server_start_stop_and_reuse(tmp_path):
    from mlflow.tracking import MlflowClient

    data, port = tmp_path / "srv", free_port()
    proc = _start(data, port)
    pids = []
    try:
        info = json.loads((data / "server.json").read_text())
        pids = [info["mlflow_pid"], info["postgres_pid"]]
        assert info["db_uri"].startswith("postgresql")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        exp = client.create_experiment("e")
        run_id = client.create_run(exp).info.run_id
        client.log_metric(run_id, "m", 1.5)
        client.set_terminated(run_id)
        # Ctrl-C stops both processes
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        deadline = time.time() + 20
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_alive(p) for p in pids)
        assert not (data / "server.json").exists()
        # a second start on the same folder reuses the database
        proc = _start(data, port)
        pids = [json.loads((data / "server.json").read_text())[k] for k in ("mlflow_pid",
                                                                              "postgres_pid")]
        again = MlflowClient(f"http://127.0.0.1:{port}").get_run(run_id)
        assert again.data.metrics["m"] == 1.5 and again.info.status == "FINISHED"
    finally:
        _stop_group(proc)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, process group, session, command line) of every live, non-zombie process."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, _, pgid, sid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if state != "Z":
            out.append((int(proc.name), int(pgid), int(sid), cmd))
    return out


def _alive_in_groups(pgids) -> list[str]:
    return [cmd for _, pgid, _, cmd in _processes() if pgid in pgids]


@pytest.mark.parametrize("sig,starting", [(signal.SIGTERM, "mlflow"),
                                          (signal.SIGINT, "pginstall/bin/postgres")])
def test_interrupt_while_starting_stops_what_was_started(sig, starting, tmp_path):
    """SIGTERM or Ctrl-C while mlflow (or PostgreSQL) is still starting: the server used to
    say "stopping" and exit 0, leaving the child it had not yet been handed back running in
    a session of its own (mlflow answered /health afterwards)."""
    data, port = tmp_path / "srv", free_port()
    proc = _launch(data, port)
    leaders: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any(starting in cmd for cmd in leaders.values()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
            leaders |= {pid: cmd for pid, _, sid, cmd in _processes()  # as serve starts them
                        if sid == pid != proc.pid and str(data) in cmd}
        assert not (data / "server.json").exists()  # still starting
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert "stopping" in out and "Traceback" not in out, out
        deadline = time.time() + 10
        while _alive_in_groups(leaders) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive_in_groups(leaders) == []
    finally:
        _stop_group(proc)
        for pgid in leaders:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_pid_file_of_another_users_live_process_means_running(tmp_path, monkeypatch):
    """postmaster.pid names a live process of another user: os.kill(pid, 0) raises
    PermissionError (it used to escape as a traceback); it is running, the file is kept."""
    from lfmodel import server

    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    (pgdata / "postmaster.pid").write_text("4242\n")
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, sig)

    monkeypatch.setattr(server.os, "kill", kill)
    started: list = []
    with pytest.raises(server.ServerError, match="already running .* \\(pid 4242\\)"):
        server.start_postgres(tmp_path, started=started)
    assert started == [] and (pgdata / "postmaster.pid").exists()


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "99999999999999999999\n", "²\n"])
def test_unreadable_pid_file_one_line(content, tmp_path):
    """An empty or corrupt postmaster.pid (a crash mid-write) used to end in a traceback."""
    pgdata = tmp_path / "d" / "pg"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("16\n")
    (pgdata / "postmaster.pid").write_text(content)
    proc = run([LFMODEL, "server", "--data", str(tmp_path / "d")], tmp_path, check=False,
               timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"lfmodel server: {pgdata / 'postmaster.pid'} has no pid in it: if no PostgreSQL uses "
        f"{pgdata}, delete the file"], proc.stderr


def test_spawn_of_a_missing_binary_is_a_server_error(tmp_path):
    from lfmodel import server

    started: list = []
    with pytest.raises(server.ServerError, match="cannot start /nonexistent/postgres: No such"):
        server._spawn(["/nonexistent/postgres"], tmp_path / "log", started, 2)
    assert started == []


def test_server_port_in_use_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run([LFMODEL, "server", "--data", str(tmp_path / "d"), "--port", str(port)],
                   tmp_path, check=False, timeout=60)
    assert proc.returncode == 2 and "already in use" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stage_fails_fast_when_nothing_listens(dvc_repo):
    """Before: 254 s of MLflow retries and a traceback. Now: one line naming the URI, < 30 s."""
    repo = dvc_repo()
    run(["dvc", "repro", "prepare"], repo)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = run([str(BIN / "python"), "-m", "stages.train"], repo,
               env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120)
    seconds = time.time() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and uri in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 30, seconds


def test_server_gone_mid_run_stops_then_rerun_resumes_into_the_same_run(dvc_repo, tmp_path):
    """The server's process group is SIGKILLed while train runs: one line naming the URI and
    the kept checkpoint, exit 1, no traceback, no checkpoint past the failed flush. With the
    server back on the same folder, a rerun resumes into the same run and finishes it, every
    logged step of loss/train in MLflow exactly once."""
    from mlflow.tracking import MlflowClient

    from lfmodel.checkpoint import load_state

    steps = 200
    repo = dvc_repo({"train": {"steps": steps, "checkpoint_every": 10, "eval_every": 100}})
    run(["dvc", "repro", "prepare"], repo)
    data, port = tmp_path / "srv", free_port()
    uri = f"http://127.0.0.1:{port}"
    env = _env({"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(repo)})
    ckpt = repo / "data/checkpoints/last.safetensors"
    server, train, pids = _start(data, port), None, []
    try:
        info = json.loads((data / "server.json").read_text())
        pids = [info["mlflow_pid"], info["postgres_pid"]]
        train = subprocess.Popen([str(BIN / "python"), "-m", "stages.train"], cwd=repo, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        deadline = time.monotonic() + 180
        while not ckpt.exists():
            assert train.poll() is None and time.monotonic() < deadline, train.communicate()
            time.sleep(0.02)
        t0 = time.monotonic()
        os.killpg(info["mlflow_pid"], signal.SIGKILL)   # the server goes away mid-run
        server.wait(60)                                 # lfmodel server stops PostgreSQL too
        out, err = train.communicate(timeout=180)
        seconds = time.monotonic() - t0
        lines = err.strip().splitlines()
        assert train.returncode == 1, (out, err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "could not be marked" in lines[0], lines[0]
        assert uri in lines[0] and f"kept in {Path('data/checkpoints/last.safetensors')}" \
            in lines[0], lines[0]
        state = load_state(ckpt)
        run_id, kept_step = state["run_id"], state["trainer"]["step"]
        assert f"checkpoint of step {kept_step} kept" in lines[0]
        assert 0 < kept_step < steps and seconds < 30, (kept_step, seconds)

        server = _start(data, port)                      # back, same database
        pids = [json.loads((data / "server.json").read_text())[k] for k in ("mlflow_pid",
                                                                              "postgres_pid")]
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "RUNNING"   # as the line said
        proc = run([str(BIN / "python"), "-m", "stages.train"], repo,
                   env={"MLFLOW_TRACKING_URI": uri}, timeout=300)
        assert f"resuming from step {kept_step} (run {run_id})" in proc.stdout, proc.stdout
        assert json.loads((repo / "reports/train/run.json").read_text())["run_id"] == run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        logged = [m.step for m in client.get_metric_history(run_id, "loss/train")]
        assert sorted(logged) == list(range(5, steps + 1, 5)), sorted(logged)
        assert not ckpt.exists()
    finally:
        if train is not None and train.poll() is None:
            _stop_group(train)
        _stop_group(server)
        for p in pids:
            if p and _alive(p):
                os.kill(p, signal.SIGKILL)
