// swift-tools-version:6.0
import PackageDescription

// Language mode 5: the proxy's per-loop state is confined to its EventLoop by design
// (DESIGN.md §3), which Swift 6's static checking cannot see without locks we must not add.
let v5: [SwiftSetting] = [.swiftLanguageMode(.v5)]
// Hot-path modules: state is confined to its event loop, so dynamic exclusivity checks
// (a runtime access set per class property access) are turned off there.
let hot: [SwiftSetting] = v5 + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]

let package = Package(
    name: "Moonlet",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "moonlet", targets: ["moonlet"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "4.5.2"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
    ],
    targets: [
        .systemLibrary(name: "CLua", pkgConfig: "lua5.4", providers: [.apt(["liblua5.4-dev"])]),
        // Budget-charging copies of the Lua library functions that loop in C, and the sandbox guards.
        .target(name: "CLuaBounded", dependencies: ["CLua"]),
        .systemLibrary(name: "CPCRE2", pkgConfig: "libpcre2-8", providers: [.apt(["libpcre2-dev"])]),
        .target(name: "MoonletHTTP", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
        ], swiftSettings: hot),
        .target(name: "MoonletCore", dependencies: [
            "MoonletHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
        ], swiftSettings: hot),
        .target(name: "MoonletRegex", dependencies: ["CPCRE2", "MoonletCore"], swiftSettings: v5),
        .target(name: "MoonletBalancer", dependencies: [
            "MoonletCore",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ], swiftSettings: hot),
        .target(name: "MoonletConfig", dependencies: [
            "MoonletCore", "MoonletHTTP", "MoonletRegex",
            .product(name: "Yams", package: "Yams"),
        ], swiftSettings: v5),
        .target(name: "MoonletTelemetry", dependencies: [
            "MoonletCore",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ], swiftSettings: hot),
        // mTLS: TLS through swift-nio-ssl (BoringSSL), certificates and the CA through
        // swift-certificates / swift-crypto. Nothing here uses the system libssl.
        .target(name: "MoonletTLS", dependencies: [
            "MoonletCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ], swiftSettings: v5),
        .target(name: "MoonletLua", dependencies: [
            "CLua", "CLuaBounded", "MoonletCore", "MoonletHTTP", "MoonletRegex", "MoonletConfig", "MoonletTelemetry",
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hot),
        .target(name: "MoonletProxy", dependencies: [
            "MoonletCore", "MoonletHTTP", "MoonletLua", "MoonletConfig", "MoonletTelemetry", "MoonletBalancer", "MoonletTLS",
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hot),
        // Sidecar plumbing with no proxy in it: istio-iptables' rules and the pod injector.
        .target(name: "MoonletSidecar", dependencies: [
            "MoonletCore",
            .product(name: "Yams", package: "Yams"),
        ], swiftSettings: v5),
        // `moonlet inject --webhook`: the injector behind an HTTPS admission webhook.
        .target(name: "MoonletWebhook", dependencies: [
            "MoonletSidecar",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], swiftSettings: v5),
        // `moonlet pilot`: validated configuration pushed to sidecars (HTTP long-poll, ACK/NACK),
        // and the sidecar's subscriber. No proxy in it: the subscriber applies through a closure.
        .target(name: "MoonletPilot", dependencies: [
            "MoonletCore", "MoonletConfig", "MoonletTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
        ], swiftSettings: v5),
        .executableTarget(name: "moonlet", dependencies: [
            "MoonletProxy", "MoonletPilot", "MoonletConfig", "MoonletLua", "MoonletTLS", "MoonletTelemetry", "MoonletSidecar", "MoonletWebhook",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: v5),
        .testTarget(name: "MoonletHTTPTests", dependencies: [
            "MoonletHTTP", "MoonletCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ], swiftSettings: v5),
        .testTarget(name: "MoonletLuaTests", dependencies: ["MoonletLua", "MoonletCore"], swiftSettings: v5),
        .testTarget(name: "MoonletTelemetryTests", dependencies: ["MoonletTelemetry", "MoonletCore"], swiftSettings: v5),
        .testTarget(name: "MoonletBalancerTests", dependencies: ["MoonletBalancer", "MoonletCore"], swiftSettings: v5),
        .testTarget(name: "MoonletConfigTests", dependencies: ["MoonletConfig", "MoonletCore", "MoonletHTTP"], swiftSettings: v5),
        .testTarget(name: "MoonletTLSTests", dependencies: [
            "MoonletTLS", "MoonletCore",
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], swiftSettings: v5),
        .testTarget(name: "MoonletSidecarTests", dependencies: [
            "MoonletSidecar", "MoonletWebhook", "MoonletTLS",
            .product(name: "Yams", package: "Yams"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], swiftSettings: v5),
        .testTarget(name: "MoonletProxyTests", dependencies: [
            "MoonletProxy", "MoonletLua", "MoonletConfig", "MoonletTLS", "MoonletPilot",
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "NIOHPACK", package: "swift-nio-http2"),
        ], swiftSettings: v5),
    ]
)
