from kdecli.cli import main

main()
