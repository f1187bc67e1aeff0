from mlecli.cli import main

main()
