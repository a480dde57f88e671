from zsd.cli import main

main()
