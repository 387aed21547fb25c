#!/bin/sh
# The TLS proxy container's entrypoint (k8s/rayservice.yaml, head pod): renders nginx.conf from
# the template beside this script with the proxy token from the environment, runs nginx, and
# reloads it (SIGHUP) when the template or a file of the PKI Secret changes. kubelet updates
# mounted ConfigMaps and Secrets in place, within about a minute of `kubectl apply`: a
# revocation (a new crl.pem) or a renewed server certificate needs no restart.
# Defaults: cloud/cloud.prod.yaml's proxy.prefix and proxy.ca_dir.
set -eu
prefix=${TANDEM_PROXY_PREFIX:-/run/tandem-proxy}
pki=${TANDEM_PROXY_PKI:-/etc/tandem/ca}
poll_s=${TANDEM_PROXY_POLL_S:-10}
template=$(dirname "$0")/nginx.conf.template
: "${TANDEM_PROXY_TOKEN:?is empty: mount the tandem-proxy-token Secret}"

mkdir -p "$prefix/logs" "$prefix/tmp"
ln -sf /dev/stderr "$prefix/logs/error.log"   # kubectl logs shows both
ln -sf /dev/stdout "$prefix/logs/access.log"
umask 077   # the rendered file holds the token

# Only the token is substituted: nginx's own $variables stay as they are.
render() { envsubst '${TANDEM_PROXY_TOKEN}' <"$template" >"$prefix/nginx.conf"; }
stamp() { cat "$template" "$pki"/* | cksum; }

seen=$(stamp)
render
nginx -p "$prefix" -e stderr -c "$prefix/nginx.conf" -g 'daemon off;' &
pid=$!
# Graceful stop: calls in flight finish.
trap 'kill -QUIT "$pid"; wait "$pid"; exit 0' TERM INT
while kill -0 "$pid" 2>/dev/null; do
    sleep "$poll_s" &
    wait $!
    now=$(stamp)
    if [ "$now" != "$seen" ]; then
        seen=$now
        echo "tls-proxy: $template or $pki changed: reloading nginx" >&2
        render
        kill -HUP "$pid"
    fi
done
wait "$pid"
