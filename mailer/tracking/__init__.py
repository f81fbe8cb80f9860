"""The tracking and recipient web app, served by `mailer serve`.

    app.py        create_app(mailer) builds the Starlette app; serve() runs it under uvicorn
    routes.py     GET /o/{token} (pixel), GET /c/{token} (click redirect), GET /healthz
    pages.py      the recipient pages: unsubscribe, confirm, preferences, sign-up
    classify.py   human or machine: what one request shows
    security.py   security headers on every response

Import create_app from mailer.tracking.app: this package module imports nothing, so the
domain modules that use mailer.tracking.classify do not load the web stack.
"""
