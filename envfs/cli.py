"""placeholder, replaced by the CLI package"""


def main() -> int:
    return 0
