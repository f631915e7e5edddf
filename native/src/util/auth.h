// Connection authentication: random secrets and nonces, HMAC-SHA256 proofs, and a
// constant-time comparison. OpenSSL's libcrypto does the cryptography (docs/security.md
// says why it and not libsodium); nothing here is hand-rolled.
//
// Every connection to an engine proves the engine's secret (PeerDescriptor::secret) with
// proof = HMAC-SHA256(secret, label || nonces || bound fields); the label separates the
// roles (target, initiator) and the backends, so a proof is never valid in another place.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string_view>

#include "kvxfer/descriptor.h"
#include "kvxfer/status.h"

namespace kvxfer::auth {

constexpr size_t kMacBytes = 32;
constexpr size_t kNonceBytes = 32;
using Mac = std::array<uint8_t, kMacBytes>;
using Nonce = std::array<uint8_t, kNonceBytes>;

// Cryptographically random bytes (OpenSSL RAND_bytes); kSystem if the generator fails.
Status randomBytes(uint8_t* out, size_t n);
Result<Bytes> randomSecret();
Result<Nonce> randomNonce();

// HMAC-SHA256 over the concatenation of `parts`, keyed by `secret`.
Mac mac(ByteView secret, std::initializer_list<ByteView> parts);
// Constant-time comparison (CRYPTO_memcmp).
bool equal(ByteView a, ByteView b);

inline ByteView view(std::string_view s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }
template <size_t N>
ByteView view(const std::array<uint8_t, N>& a) {
    return {a.data(), a.size()};
}
inline ByteView view(const uint64_t& v) { return {reinterpret_cast<const uint8_t*>(&v), sizeof(v)}; }

}  // namespace kvxfer::auth
