from enginedge.entrypoints.cli import main

main()
