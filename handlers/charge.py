"""Example handler for a task that must not be done twice: charge an order.

Tasks run at least once: a task whose worker is lost runs again elsewhere, and a failure is
retried if the task asks for it. So a real charge hands its payment service an idempotency
key, here ``order-ID``, with which a second attempt finds the first payment instead of
making another.
"""

from martinet_app import task


@task
def charge(task_id, data, progress):
    """Charge order ``data["order"]`` for ``data["cents"]`` (default 1000); a stand-in for a payment call."""
    order = int(data["order"])
    cents = int(data.get("cents", 1000))
    if cents <= 0:
        raise ValueError(f"order {order}: nothing to charge ({cents} cents)")
    return {"order": order, "cents": cents, "idempotency_key": f"order-{order}", "paid": True}
