"""The errors mailer raises on purpose, one shallow tree.

    MailerError                 anything mailer reports to a user without a traceback
    ├── BadInput                exit 2: the user's input is wrong, nothing was written
    │   ├── ConfigError         settings, secret keys, the database URL
    │   ├── CsvFileError        a contacts file that cannot be read as a whole
    │   ├── AttestationError    a vendor attestation that is missing, incomplete or invalid
    │   └── InvalidAddress      an e-mail address that is not one
    ├── DatabaseError           exit 2: the database is down, missing or not migrated
    └── NotFound                exit 1: the thing named does not exist

The CLI maps these to exit codes in one place; business code never exits.
"""

from __future__ import annotations


class MailerError(Exception):
    exit_code = 1


class BadInput(MailerError):
    exit_code = 2


class ConfigError(BadInput):
    pass


class CsvFileError(BadInput):
    pass


class AttestationError(BadInput):
    pass


class InvalidAddress(BadInput):
    pass


class DatabaseError(MailerError):
    exit_code = 2


class NotFound(MailerError):
    exit_code = 1
