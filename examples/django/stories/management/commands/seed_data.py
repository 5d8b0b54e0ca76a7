"""Create members and stories for tests, demos and locust runs."""
from django.core.management.base import BaseCommand
from django.db import transaction

from stories.models import Member, Story

WORDS = (
    "lantern harbor winter orchard river signal quiet engine paper garden "
    "compass meadow archive thunder velvet copper island morning"
).split()


class Command(BaseCommand):
    help = "Seed the database with members and stories (idempotent per username)."

    def add_arguments(self, parser):
        parser.add_argument("--users", type=int, default=10)
        parser.add_argument("--stories", type=int, default=100)

    @transaction.atomic
    def handle(self, *args, users, stories, **options):
        members = []
        for i in range(1, users + 1):
            member, _ = Member.objects.get_or_create(
                username=f"reader{i}", defaults={"display_name": f"Reader {i}"}
            )
            members.append(member)
        batch = []
        for i in range(stories):
            words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3)]
            batch.append(
                Story(
                    title=" ".join(words).title(),
                    body=f"Story {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40)),
                    author=members[i % len(members)],
                )
            )
        Story.objects.bulk_create(batch)
        self.stdout.write(f"seeded {len(members)} members and {len(batch)} stories")
