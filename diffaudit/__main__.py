from diffaudit.cli import main

main()
