"""`pagedserve chat` driven through a pseudo-terminal against a real server: answers equal
what the same greedy request gets through the API, turn after turn; Ctrl-C stops a streaming
answer (the server aborts it) without leaving; Ctrl-D quits; a wrong key and an unreachable
server are one line on stderr and exit status 1."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.integration.conftest import API_KEY, MODEL_NAME, REPO, RunningServer, _free_port

SYSTEM = "You answer briefly."
CHAT = [sys.executable, "-m", "server", "chat"]
PROMPT = "\n> "  # the prompt, after the banner or an answer's final newline


@dataclass(slots=True)
class Terminal:
    """`pagedserve chat` on a pty: what it prints is read as it comes, keys are typed."""

    pid: int
    fd: int
    pending: bytearray = field(default_factory=bytearray)

    def read_until(self, marker: str, timeout_s: float = 30.0) -> str:
        """The output up to and including `marker` (CRLF read as LF), consumed."""
        wanted = marker.replace("\n", "\r\n").encode()
        deadline = time.monotonic() + timeout_s
        while (index := self.pending.find(wanted)) < 0:
            self._read_more(deadline, f"{marker!r}")
        end = index + len(wanted)
        taken = bytes(self.pending[:end])
        del self.pending[:end]
        return taken.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def wait_for_output(self, timeout_s: float = 30.0) -> None:
        """Until something more has been printed."""
        deadline = time.monotonic() + timeout_s
        while not self.pending:
            self._read_more(deadline, "any output")

    def _read_more(self, deadline: float, expected: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no {expected} from the chat; it printed {bytes(self.pending)!r}")
        if not select.select([self.fd], [], [], remaining)[0]:
            return
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child is gone and the pty closed
            chunk = b""
        if not chunk:
            pytest.fail(f"the chat exited before {expected}; it printed {bytes(self.pending)!r}")
        self.pending += chunk

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        pytest.fail("the chat did not exit")


@pytest.fixture
def terminal_factory() -> Iterator[list[Terminal]]:
    """Collects the terminals a test opens; each one's process is killed if still alive."""
    terminals: list[Terminal] = []
    yield terminals
    for terminal in terminals:
        try:
            if os.waitpid(terminal.pid, os.WNOHANG)[0] == 0:
                os.kill(terminal.pid, 9)
                os.waitpid(terminal.pid, 0)
        except ChildProcessError:
            pass
        os.close(terminal.fd)


def open_chat(terminals: list[Terminal], *args: str) -> Terminal:
    # TERM=dumb: readline draws no escape sequences; no key from the environment
    env = {key: value for key, value in os.environ.items()
           if key not in ("PAGEDSERVE_API_KEY", "OPENAI_API_KEY")}
    env.update(TERM="dumb", PYTHONUNBUFFERED="1")
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once (the parent has threads)
        try:
            os.chdir(REPO)
            os.execve(sys.executable, [*CHAT, *args], env)
        finally:
            os._exit(127)
    terminal = Terminal(pid, fd)
    terminals.append(terminal)
    return terminal


def greedy_answer(server: RunningServer, messages: list[dict[str, str]],
                  max_tokens: int) -> tuple[str, int]:
    """What the API answers to `messages` with temperature 0, and its number of tokens."""
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert response.usage is not None
    return response.choices[0].message.content or "", response.usage.completion_tokens


def test_answers_stream_with_the_conversation_history(
        server: RunningServer, terminal_factory: list[Terminal]) -> None:
    first, second = "Tell me about paged attention.", "And continuous batching?"
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    answer_1, _ = greedy_answer(server, history, max_tokens=12)
    history += [{"role": "assistant", "content": answer_1}, {"role": "user", "content": second}]
    answer_2, _ = greedy_answer(server, history, max_tokens=12)
    assert answer_1 and answer_2 and answer_1 != answer_2  # else the comparison proves little

    chat = open_chat(terminal_factory, server.base_url, "--api-key", API_KEY, "--system",
                     SYSTEM, "--temperature", "0", "--max-tokens", "12")
    assert MODEL_NAME in chat.read_until(PROMPT)  # the banner names /v1/models' first model
    for question, answer in ((first, answer_1), (second, answer_2)):
        chat.type(question + "\n")
        # the typed line echoed, then exactly the API's answer, then the next prompt
        assert chat.read_until(answer + PROMPT) == f"{question}\n{answer}{PROMPT}"
    chat.type("/exit\n")
    assert chat.wait() == 0


def test_ctrl_c_stops_the_answer_and_ctrl_d_quits(
        server: RunningServer, terminal_factory: list[Terminal]) -> None:
    question = "Count to a hundred."
    messages = [{"role": "user", "content": question}]
    full_answer, num_tokens = greedy_answer(server, messages, max_tokens=100)
    assert num_tokens >= 20  # long enough that Ctrl-C lands mid-answer
    # 0.1 s a step from here on: the answer would take 2 s or more, Ctrl-C comes at once
    server.engine.fault_hooks.on_execute = lambda sequences: time.sleep(0.1)
    try:
        chat = open_chat(terminal_factory, server.base_url, "--api-key", API_KEY,
                         "--model", MODEL_NAME, "--temperature", "0", "--max-tokens", "100")
        chat.read_until(PROMPT)
        chat.type(question + "\n")
        chat.read_until(question + "\n")
        chat.wait_for_output()  # the first tokens are on the screen: the answer streams
        chat.type("\x03")
        shown = chat.read_until(" [stopped]" + PROMPT)
        server.wait_idle(timeout_s=5)  # the closed stream aborted the request in the engine
    finally:
        server.engine.fault_hooks.on_execute = None
    partial = shown.removesuffix(" [stopped]" + PROMPT).replace("^C", "")  # the tty echoes ^C
    assert partial and full_answer.startswith(partial) and len(partial) < len(full_answer)
    chat.type("\x04")  # Ctrl-D at the prompt
    assert chat.wait() == 0


def _run_chat(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base_env = {key: value for key, value in os.environ.items()
                if key not in ("PAGEDSERVE_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([*CHAT, *args], cwd=REPO, env={**base_env, **(env or {})},
                          input="/exit\n", capture_output=True, text=True, timeout=60)


def test_wrong_key_is_one_line_naming_401_and_env_keys_work(server: RunningServer) -> None:
    refused = _run_chat(server.base_url, env={"OPENAI_API_KEY": "sk-wrong"})
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "refused the API key (401" in refused.stderr
    # PAGEDSERVE_API_KEY wins over OPENAI_API_KEY; of a list (as the server reads it), the first
    accepted = _run_chat(server.base_url + "/v1", env={
        "PAGEDSERVE_API_KEY": f"{API_KEY},sk-other", "OPENAI_API_KEY": "sk-wrong"})
    assert accepted.returncode == 0, accepted.stderr
    assert f"chatting with {MODEL_NAME}" in accepted.stdout


def test_unreachable_server_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = _run_chat(url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"cannot reach the server at {url}" in result.stderr
