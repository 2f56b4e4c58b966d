from quasr.cli import main

main()
