"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input from the user: printed as one line (problem and fix), exit code 2.

    Example:
        raise UserError("--num-heads 5 does not divide --d-model 128; pick 4 or 8")
    """

    exit_code = 2
