"""Any storage SOP class, in the transfer syntax the sender proposes first, per association.

The spool keeps an instance's bytes as they came, so the receiver need not know a storage
SOP class or transfer syntax to take it. Listing every one (~150 classes x ~40 syntaxes) cost
0.4 s of CPU per association, which pynetdicom deep-copies; pynetdicom's own switch,
`_config.UNRESTRICTED_STORAGE_SERVICE`, is process-wide (every acceptor in the process would
accept anything). Here, when an association is requested, the storage-like contexts it
proposes become its own supported contexts: those of a storage SOP class pynetdicom knows,
and private or unknown ones (as pynetdicom's unrestricted mode takes them), which are
registered with pynetdicom's storage service (`register_uid`, its public way to serve a
private class) so that their C-STOREs reach the receiver's handler.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.uid import UID
from pynetdicom import register_uid, sop_class
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass

from cadnode.core.files import is_valid_uid

# Private or unknown SOP classes registered in this process, at most: each is a module-level
# name in pynetdicom, so a peer proposing new ones forever must not grow it without end.
MAX_REGISTERED = 1024

_registered: set[str] = set()
_lock = threading.Lock()


def accept_proposed_storage(association: Any) -> None:
    """Make the storage-like contexts `association` proposes supported; call it from
    EVT_REQUESTED, before pynetdicom negotiates."""
    acceptor = association.acceptor
    supported = {str(cx.abstract_syntax) for cx in acceptor.supported_contexts}
    added: dict[str, list[str]] = {}
    for proposed in association.requestor.primitive.presentation_context_definition_list:
        uid = UID(str(proposed.abstract_syntax))
        if uid in supported or not _storage_like(uid):
            continue
        syntaxes = added.setdefault(uid, [])
        syntaxes.extend(str(ts) for ts in proposed.transfer_syntax if str(ts) not in syntaxes)
    if added:
        acceptor.supported_contexts = [
            *acceptor.supported_contexts,
            *(_context(uid, syntaxes) for uid, syntaxes in added.items()),
        ]


def _storage_like(uid: UID) -> bool:
    if not is_valid_uid(str(uid)):
        return False  # pynetdicom rejects the context
    known = sop_class.uid_to_service_class(uid)
    if known is StorageServiceClass:
        return True
    # pynetdicom's base class: a SOP class it does not know, taken as a (private) storage one
    return known is ServiceClass and _register(uid)


def _register(uid: UID) -> bool:
    with _lock:
        if uid in _registered:
            return True
        if len(_registered) >= MAX_REGISTERED:
            return False
        register_uid(uid, "CadnodeStorage_" + uid.replace(".", "_"), StorageServiceClass)
        _registered.add(uid)
        return True


def _context(uid: str, syntaxes: list[str]) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = UID(uid)
    context.transfer_syntax = [UID(ts) for ts in syntaxes]
    # Either role, as the requestor proposes: a C-GET's peer takes the C-STOREs back as SCP.
    context.scu_role = True
    context.scp_role = True
    return context
