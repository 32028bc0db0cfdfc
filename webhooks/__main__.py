from webhooks.worker import main

main()
