"""`manage.py cache_invalidate TAG [TAG ...] [--soft]`: invalidate cache tags
in every gateway, from the shell or a deploy script."""

from django.core.management.base import BaseCommand

from gatehouse_cache import invalidate


class Command(BaseCommand):
    help = "Make cached responses carrying these tags stale in every gateway."

    def add_arguments(self, parser):
        parser.add_argument("tags", nargs="+")
        parser.add_argument("--soft", action="store_true", help="stale but kept for revalidation")

    def handle(self, *args, **options):
        generation = invalidate(*options["tags"], soft=options["soft"])
        self.stdout.write(f"invalidated {' '.join(options['tags'])} (generation {generation})")
