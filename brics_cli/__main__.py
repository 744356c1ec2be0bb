from brics_cli.cli import main

main()
