from mlecli.cli import entry

entry()
