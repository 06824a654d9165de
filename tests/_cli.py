"""The one in-process `mass-export` invocation the tests share: the real click command on real files."""

from click.testing import CliRunner

from mass_export_cli.main import main


def cli(*args, env: dict | None = None):
    """Run ``mass-export ARGS`` in this process; exceptions that escape the command's own handling propagate."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
