from mlecli.cli import entry

if __name__ == "__main__":  # python -m mlecli; never on a mere import
    entry()
