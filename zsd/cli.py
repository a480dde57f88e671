"""Command line: a thin layer over the library; every command maps onto one library call."""

from __future__ import annotations

import sys

import click

from zsd import __version__
from zsd.errors import ZsdError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zsd")
def cli():
    """zsd: distil a CLIP image encoder into a small student from cached teacher embeddings.

    Data flow: image source -> teacher (cache-teacher) -> embedding store -> student (train)
    -> evaluation (eval) and train/test coverage audit (coverage).
    """


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="zsd", standalone_mode=False)
    except ZsdError as e:
        click.echo(f"zsd: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("zsd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
