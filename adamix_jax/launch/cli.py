"""What the console scripts share: user errors, quiet logs, XLA settings.

**User errors.** A problem the user can fix (a bad command line, an unknown
config field, a workdir made by another config, bad data, a missing file)
ends the command with ONE line on stderr, ``PROG: error: MESSAGE``, and exit
code 2; no traceback. Everything else is a bug and keeps its traceback. A
user error is:

* a ``UserError`` (raised by the entry points themselves), a
  ``workdir.ConfigMismatchError``, an ``accounting.BudgetExceededError``, an
  absl flags error or ``app.UsageError``;
* a ``ValueError``, ``KeyError``, ``TypeError`` or ``OSError`` (a missing
  file, a permission) raised *by adamix_jax's own code*, i.e. the innermost
  frame of its traceback is in this package: the validation of configs,
  data and workdirs raises those on purpose, with a message that names the
  problem and the fix. The same types raised inside jax, numpy or another
  library are bugs and keep their traceback.

``ADAMIX_TRACEBACK=1`` shows the traceback of user errors too. Nothing is
deleted on a user error: finished units stay, and the same command resumes
once the problem is fixed.

**Quiet logs.** ``quiet_third_party_logs()`` drops absl's (orbax's) and
TensorFlow's INFO lines; warnings stay.

**Simulated CPU devices.** XLA aborts the process (SIGABRT) when the
threads of one CPU collective reach it more than 20 + 40 s apart, which a
loaded machine running several simulated devices
(``--xla_force_host_platform_device_count``) does. ``configure_xla()``
raises that limit (``CPU_COLLECTIVE_FLAGS``) before jax starts.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Any, Callable, NoReturn, Sequence

EXIT_USER_ERROR = 2
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK_ENV = "ADAMIX_TRACEBACK"

# XLA's CPU collectives: warn after 20 s and abort after 40 s more by default
# (jaxlib 0.10.2, xla/debug_options_flags.cc). Simulated devices are threads
# of one process: on a loaded machine they drift apart by more than that.
CPU_COLLECTIVE_FLAGS = {
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 300,
    "xla_cpu_collective_call_terminate_timeout_seconds": 1800,
}
SIMULATED_DEVICES_FLAG = "xla_force_host_platform_device_count"


class UserError(Exception):
  """A problem with the user's input, reported as one line (exit code 2)."""


def _user_error_types() -> tuple[type, ...]:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from adamix_jax.experiment import workdir  # pylint: disable=g-import-not-at-top
  from adamix_jax.privacy import accounting  # pylint: disable=g-import-not-at-top
  return (UserError, workdir.ConfigMismatchError,
          accounting.BudgetExceededError, flags.Error, app.UsageError)


def _raised_here(error: BaseException) -> bool:
  """Whether the innermost frame of ``error``'s traceback is adamix_jax's."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return filename.startswith(PACKAGE_DIR + os.sep)


def is_user_error(error: BaseException) -> bool:
  """See the module docstring: what the user can fix, vs a bug."""
  if isinstance(error, _user_error_types()):
    return True
  if isinstance(error, (ValueError, KeyError, TypeError, OSError)):
    return _raised_here(error)
  return False


def one_line(error: BaseException | str) -> str:
  """The error's message on one line (a KeyError's without its quotes)."""
  if isinstance(error, BaseException):
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(
        error.args[0], str):
      text = error.args[0]
    else:
      text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and not error.strerror:
      text = f"{text}: {error.filename}"
    elif isinstance(error, OSError) and error.strerror and error.filename:
      text = f"{error.strerror}: {error.filename}"
  else:
    text = error
  return " ".join(text.split())


def fail(prog: str, message: BaseException | str) -> NoReturn:
  """Prints ``PROG: error: MESSAGE`` (one line) to stderr; exits with 2."""
  sys.stdout.flush()
  print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def report_errors(prog: str, function: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> Any:
  """Calls ``function``; a user error becomes ``fail(prog, error)``, Ctrl-C
  one line saying how to resume (exit code 130)."""
  try:
    return function(*args, **kwargs)
  except KeyboardInterrupt:
    if os.environ.get(TRACEBACK_ENV):
      raise
    print(f"\n{prog}: interrupted. Finished work is kept in the workdir: "
          "rerun the same command to resume.", file=sys.stderr, flush=True)
    sys.exit(130)
  except Exception as error:  # pylint: disable=broad-except
    if is_user_error(error) and not os.environ.get(TRACEBACK_ENV):
      fail(prog, error)
    raise


def flags_parser(prog: str) -> Callable[[Sequence[str]], list[str]]:
  """An absl ``flags_parser``: a bad command line is one line, exit 2.

  Also refuses stray positional arguments (``--seeds 0 1`` would otherwise
  leave "1" unused): every flag takes ``--name=value``, lists comma
  separated.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      rest = flags.FLAGS(list(argv))
    except flags.Error as error:
      fail(prog, error)
    except Exception as error:  # pylint: disable=broad-except
      # Loading the config file or applying --config.* overrides.
      if os.environ.get(TRACEBACK_ENV):
        raise
      fail(prog, f"{type(error).__name__}: {one_line(error)}"
           if not isinstance(error, (ValueError, KeyError, OSError))
           else error)
    if len(rest) > 1:
      fail(prog, f"unexpected argument(s) {rest[1:]}: give every flag as "
           "--name=value, lists comma separated (e.g. --seeds=0,1).")
    return rest

  return parse


class _DropRdpConvergenceWarnings(logging.Filter):
  """dp_accounting's RDP accountant warns, for each order it cannot compute
  (small sigma), that it leaves that order out: the result stays a valid
  upper bound, and the progress bars ask for it often."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith("rdp_privacy_accountant.py")
                and "failed to converge" in record.getMessage())


_RDP_FILTER = _DropRdpConvergenceWarnings()


def quiet_third_party_logs() -> None:
  """Only warnings and errors from absl (orbax), TensorFlow and jax, and
  none of dp_accounting's RDP convergence notes."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow"):
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if _RDP_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_RDP_FILTER)


def simulated_cpu_devices(xla_flags: str | None = None) -> int:
  """The ``--xla_force_host_platform_device_count`` in XLA_FLAGS (0: none)."""
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else (
      xla_flags)
  count = 0
  for token in xla_flags.split():
    name, _, value = token.lstrip("-").partition("=")
    if name == SIMULATED_DEVICES_FLAG:
      try:
        count = int(value)
      except ValueError:
        count = 0
  return count


def xla_flags_with_cpu_collective_timeouts(xla_flags: str) -> str:
  """``xla_flags`` plus ``CPU_COLLECTIVE_FLAGS`` it does not set already."""
  present = {token.lstrip("-").partition("=")[0]
             for token in xla_flags.split()}
  added = [f"--{name}={value}" for name, value in CPU_COLLECTIVE_FLAGS.items()
           if name not in present]
  return " ".join([xla_flags.strip()] + added).strip()


def configure_xla() -> None:
  """Sets the CPU collective timeouts when CPU devices are simulated.

  Must run before jax creates its CPU client (the entry points call it
  first thing); ``parallel.warn_if_collectives_may_abort`` warns when a
  mesh of simulated devices was made without it.
  """
  if simulated_cpu_devices() > 1:
    os.environ["XLA_FLAGS"] = xla_flags_with_cpu_collective_timeouts(
        os.environ.get("XLA_FLAGS", ""))


def config_value(argv: Sequence[str]) -> str:
  """The ``--config`` value of ``argv`` (the default config when absent)."""
  from adamix_jax import configs  # pylint: disable=g-import-not-at-top
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return configs.default_path()


def define_config_flag(argv: Sequence[str], help_text: str) -> None:
  """Checks the config and its ``--config.*`` overrides, then defines
  ``--config`` (an ml_collections config file flag, locked).

  Call it before absl parses ``argv``, not at import: ml_collections parses
  the default config's overrides while the flag is being defined, and a
  typo there would end in a traceback. Checked first, it is one line
  naming the field (``configs.check_overrides``).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from adamix_jax import configs  # pylint: disable=g-import-not-at-top
  value = config_value(argv)
  config = configs.load(value)
  configs.check_overrides(config, argv, os.path.splitext(
      os.path.basename(value.partition(":")[0]))[0])
  config_flags.DEFINE_config_file("config", configs.default_path(), help_text,
                                  lock_config=True)


# The command line as the user typed it (before config names resolve to
# paths): what results files record as their command.
TYPED_ARGV: list[str] = []


def typed_command(prog: str) -> str:
  """``prog`` and the arguments as typed (``run_with_config`` keeps them)."""
  return " ".join([prog] + [shlex.quote(a) for a in TYPED_ARGV[1:]])


def run_with_config(prog: str, main: Callable[[Sequence[str]], Any],
                    help_text: str) -> None:
  """An absl entry point with ``--config`` (a packaged name or a file) and
  its ``--config.field=value`` overrides: XLA's CPU timeouts set first,
  the config and overrides checked before absl parses, every user error
  one line. ``main`` reads the config from ``flags.FLAGS.config``."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  TYPED_ARGV[:] = sys.argv
  configure_xla()
  sys.argv = report_errors(prog, resolve_config_names, sys.argv)
  report_errors(prog, define_config_flag, sys.argv, help_text)
  flags.declare_key_flag("config")  # listed by --help
  app.run(lambda argv: report_errors(prog, main, argv),
          flags_parser=flags_parser(prog))


def resolve_config_names(argv: Sequence[str]) -> list[str]:
  """``--config NAME`` (packaged) -> ``--config PATH``, before absl parses.

  Without ``--config``, a generic ``--config.dataset`` (``image_folder``,
  ``npz``) adds ``--config=`` its packaged config (``configs.default_for``).
  """
  from adamix_jax import configs  # pylint: disable=g-import-not-at-top
  out = list(argv)
  given = False
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + configs.resolve(arg[len("--config="):])
      given = True
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = configs.resolve(out[i + 1])
      given = True
  if not given and configs.default_for(out) != configs.default_path():
    out.insert(1, "--config=" + configs.default_for(out))
  return out
