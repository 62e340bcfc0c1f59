package resolver

import (
	"context"
	"fmt"
	"sync"

	grpcresolver "google.golang.org/grpc/resolver"
)

// GRPCScheme is the URI scheme of the grpc-go resolver built by
// [NewBuilder]: "streamlb-dns:///name:port" (system resolver) or
// "streamlb-dns://dnshost:dnsport/name:port" (ask that server).
const GRPCScheme = "streamlb-dns"

// NewBuilder returns a grpc-go resolver builder for [GRPCScheme], for gRPC
// clients that balance on their own instead of through the proxy.
//
// grpc-go's built-in "dns" resolver re-resolves only when a connection
// breaks, so backends added by a scale-out get no traffic until then. The
// resolvers this builder makes run the same refresh loop as [DNS], with
// opts, and hand every changed set to the channel; a grpc-go ResolveNow
// (sent when a connection fails) triggers an early, rate-limited lookup.
// A failed lookup is reported to the channel, which keeps its addresses.
// Weights are not passed on.
//
// The builder is not registered globally; pass it to each channel:
//
//	cc, err := grpc.NewClient("streamlb-dns://10.0.0.10:53/backend.default.svc.cluster.local:50051",
//		grpc.WithResolvers(resolver.NewBuilder(resolver.DNSOptions{})),
//		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
//		grpc.WithTransportCredentials(insecure.NewCredentials()))
//
// Without a round_robin (or similar) policy, grpc-go's default pick_first
// sends every call to one backend whatever the resolver finds.
func NewBuilder(opts DNSOptions) grpcresolver.Builder {
	return &builder{opts: opts}
}

type builder struct {
	opts DNSOptions
}

// Scheme implements grpcresolver.Builder.
func (b *builder) Scheme() string { return GRPCScheme }

// Build implements grpcresolver.Builder. It starts the refresh loop on a
// goroutine that Close stops and waits for.
func (b *builder) Build(target grpcresolver.Target, cc grpcresolver.ClientConn, _ grpcresolver.BuildOptions) (grpcresolver.Resolver, error) {
	t, err := ParseTarget(SchemeDNS + "://" + target.URL.Host + "/" + target.Endpoint())
	if err != nil {
		return nil, fmt.Errorf("resolver: %s target %q: %w", GRPCScheme, target.String(), err)
	}
	d, err := NewDNS(t, b.opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &grpcResolver{dns: d, cancel: cancel}
	r.wg.Go(func() { r.watch(ctx, ccUpdater{cc}) })
	return r, nil
}

// grpcResolver is the grpcresolver.Resolver of one channel.
type grpcResolver struct {
	dns    *DNS
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// watch runs the refresh loop until Close.
func (r *grpcResolver) watch(ctx context.Context, u Updater) {
	_ = r.dns.Run(ctx, u) // returns nil once ctx is cancelled
}

// ResolveNow implements grpcresolver.Resolver; see [DNS.ResolveNow].
func (r *grpcResolver) ResolveNow(grpcresolver.ResolveNowOptions) { r.dns.ResolveNow() }

// Close implements grpcresolver.Resolver: it stops the refresh loop and
// waits for it, so the channel sees no call after Close returns.
func (r *grpcResolver) Close() {
	r.cancel()
	r.wg.Wait()
}

// ccUpdater adapts a grpc-go ClientConn to Updater.
type ccUpdater struct {
	cc grpcresolver.ClientConn
}

func (u ccUpdater) UpdateState(s State) error {
	addrs := make([]grpcresolver.Address, len(s.Addresses))
	for i, a := range s.Addresses {
		addrs[i] = grpcresolver.Address{Addr: a.Addr}
	}
	// An error means the balancer rejected the set, for example an empty
	// one; DNS.Run then offers the next lookup's set again.
	return u.cc.UpdateState(grpcresolver.State{Addresses: addrs})
}

func (u ccUpdater) ReportError(err error) { u.cc.ReportError(err) }
