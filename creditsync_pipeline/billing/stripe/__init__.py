"""The Stripe provider (``BILLING_PROVIDER=stripe``): Stripe subscriptions as SPEC records.

* :mod:`.subscriptions` -- the mapping, pure: which instance a subscription belongs to,
  its plan, status and period end (the table of every case is there);
* :mod:`.lists` -- Stripe's lists over HTTP: pages, the pipelined walk, search, errors;
* :mod:`.provider` -- :class:`StripeProvider`: what to ask, what the answers mean.

What it asks Stripe (bearer ``STRIPE_API_KEY``, ``Stripe-Version: 2025-03-31.basil``; the
older shape, periods on the subscription and items with only a ``plan``, is read too):

* **Full list** -- ``GET /v1/subscriptions?status=all&limit=100&expand[]=data.customer``,
  paged with ``starting_after`` (the last id of a page) until ``has_more`` is false. The
  next page is fetched while the current one is mapped. A subscription listed twice (a
  server that restarts the list on an unknown ``starting_after``) or a page of the wrong
  shape fails the run: nothing is written. A subscription without an instance (neither it
  nor its customer carries ``metadata[STRIPE_INSTANCE_METADATA_KEY]``) is counted in
  ``snapshot.unassigned``, never a failure. Once the list is complete, the instance ->
  customer link of each instance (the customer of its newest subscription) is remembered.
* **Per instance** (targeted syncs) -- ``GET /v1/subscriptions?customer=C&status=all`` for
  the remembered customer. When that shows nothing entitling (or there is no link, or
  Stripe no longer knows the customer), ``/v1/customers/search`` and
  ``/v1/subscriptions/search`` with ``metadata['KEY']:'ID'`` name further customers, whose
  lists are read too (search matches case-insensitively: every hit is compared exactly).
  Finding no subscription of the instance at all is not "no subscription": search lags
  about a minute and some servers have none (a 404 counts as "found none"), so the
  instance is ``UNLINKED`` -- left alone and reported; only a full list may send a paid
  instance to free. Found links are remembered.
* **Access check** -- one list call of one record.

Errors: Stripe's ``{"error": {"type", "code", "message"}}`` is named in messages
(sanitised: no key, nothing key-like); 401/403 raise :class:`BillingAuthError`; 429 and
5xx are retried with backoff (:class:`..http.HttpApi`).

Why raw httpx + orjson and not the official ``stripe`` library: see ``docs/stripe.md``
(measured at 100,000 subscriptions). The library is used in the tests to cross-check the
webhook signature scheme, and in the benchmark.
"""

from __future__ import annotations

from .lists import MAX_PAGE_SIZE, guess_next, search_query, stripe_error
from .provider import StripeProvider
from .subscriptions import API_VERSION, SubscriptionMapper, instance_of, item_identifier

__all__ = [
    "API_VERSION",
    "MAX_PAGE_SIZE",
    "StripeProvider",
    "SubscriptionMapper",
    "guess_next",
    "instance_of",
    "item_identifier",
    "search_query",
    "stripe_error",
]
