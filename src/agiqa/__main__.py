from agiqa.cli import main

main()
