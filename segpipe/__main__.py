from segpipe.cli import main

main()
